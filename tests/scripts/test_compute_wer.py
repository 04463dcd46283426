import json
import subprocess
import sys

import pytest

from tests.cli import load_script

compute_wer = load_script("compute_wer")


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_summary_counts_and_missing_utterances(tmp_path, capsys):
    ref = write(tmp_path / "ref", ["a 我们去公园", "b 今天2024年", "c 你好世界"])
    hyp = write(tmp_path / "hyp", ["a 你们去园", "b 今天二零二四年", "z 多余"])
    out_json = tmp_path / "wer.json"
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--metric", "char", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out.strip().split("\n")
    # a: 1 sub (我->你) + 1 del (公) over 5; b: 0 over 7; c: no hypothesis -> left out of the
    # figure (Seed-TTS-eval's rule for missing audio), counted on its own. Counting it as empty
    # would give 6 / 16 = 37.50%.
    assert printed[-1] == "%CER 16.67 [ 2 / 12, 0 ins, 1 del, 1 sub ] 2 utterances, 1 missing (no transcript, left out)"
    assert "# missing, no transcript, left out of the figures (1): c" in printed
    assert any(line.startswith("# in hyp but not in ref") for line in printed)
    payload = json.loads(out_json.read_text())
    summary = payload["summary"]
    assert summary["error_rate"] == pytest.approx(2 / 12) and summary["missing"] == ["c"]
    assert summary["missing_count"] == 1 and summary["utterances"] == 2
    assert [u["utt_id"] for u in payload["utterances"]] == ["a", "b"]
    assert summary["extra_hypotheses"] == ["z"]


@pytest.mark.parametrize("metric", ["protocol", "pinyin", "char"])
def test_every_metric_leaves_missing_transcripts_out_of_the_mean(tmp_path, capsys, metric):
    # a: perfect; b: all wrong; c: no transcript. With c left out: (0 + 1) / 2 = 50% for the
    # protocol's mean of rates, and 2 errors / 4 reference tokens = 50% for our corpus rate.
    ref = write(tmp_path / "ref", ["a 你好", "b 再见", "c 明天见"])
    hyp = write(tmp_path / "hyp", ["a 你好", "b 一二"])
    out_json = tmp_path / "wer.json"
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--metric", metric, "--json", str(out_json)]) == 0
    summary = json.loads(out_json.read_text())["summary"]
    assert summary["error_rate"] == pytest.approx(0.5)
    assert (summary["missing"], summary["missing_count"], summary["utterances"]) == (["c"], 1, 2)
    assert summary["ref_length"] == 4
    assert "1 missing (no transcript, left out)" in capsys.readouterr().out.strip().split("\n")[-1]


def test_no_transcript_at_all_has_no_figure(tmp_path, capsys):
    ref = write(tmp_path / "ref", ["a 你好", "b 再见"])
    hyp = write(tmp_path / "hyp", ["z 多余"])
    out_json = tmp_path / "wer.json"
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--metric", "protocol", "--json", str(out_json)]) == 0
    last = capsys.readouterr().out.strip().split("\n")[-1]
    assert last.startswith("%CER n/a [ 0 / 0,") and "0 utterances" in last and "2 missing" in last
    summary = json.loads(out_json.read_text())["summary"]
    assert summary["error_rate"] is None and summary["corpus_error_rate"] is None
    assert summary["missing_count"] == 2


def test_pinyin_metric_forgives_homophones(tmp_path, capsys):
    ref = write(tmp_path / "ref", ["a 他们来了"])
    hyp = write(tmp_path / "hyp", ["a 她们来了"])
    compute_wer.main(["--ref", ref, "--hyp", hyp])
    assert capsys.readouterr().out.strip().split("\n")[-1].startswith("%PER 0.00 [ 0 / 4,")


def test_details_file_and_empty_hypothesis(tmp_path, capsys):
    ref = write(tmp_path / "ref", ["a 你好", "b 再见"])
    hyp = write(tmp_path / "hyp", ["a", "b 再见"])
    details = tmp_path / "details.txt"
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--details", str(details), "--metric", "char"]) == 0
    assert capsys.readouterr().out.strip() == "%CER 50.00 [ 2 / 4, 0 ins, 2 del, 0 sub ] 2 utterances"
    text = details.read_text()
    assert "a 100.00 2/2 (0 2 0)" in text and "# worst 2 utterances\na 100.00" in text


@pytest.mark.parametrize("ref_lines,hyp_lines,message", [
    (["a 你好", "a 再见"], ["a 你好"], "ref:2: duplicate utterance id 'a' (first on line 1)"),
    (["a 你好"], ["a 你好", "a 你"], "hyp:2: duplicate utterance id 'a'"),
    (["a"], ["a 你好"], "ref:1: utterance 'a' has no reference text"),
    (["a 。。。"], ["a 你好"], "utterance 'a': reference '。。。' is empty after normalization"),
    (["a 你好", "b 。。。"], ["a 你好"], "utterance 'b': reference '。。。' is empty"),  # checked though missing
])
def test_bad_input_is_an_error(tmp_path, capsys, ref_lines, hyp_lines, message):
    ref = write(tmp_path / "ref", ref_lines)
    hyp = write(tmp_path / "hyp", hyp_lines)
    out_json = tmp_path / "wer.json"
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--json", str(out_json)]) == 1
    assert message in capsys.readouterr().err
    assert not out_json.exists()


def test_runs_as_a_script_from_elsewhere(tmp_path):
    ref = write(tmp_path / "ref", ["a 你好"])
    hyp = write(tmp_path / "hyp", ["a 你好"])
    done = subprocess.run([sys.executable, compute_wer.__file__, "--ref", ref, "--hyp", hyp], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip().split("\n")[-1] == "%PER 0.00 [ 0 / 2, 0 ins, 0 del, 0 sub ] 1 utterances"


def test_protocol_metric_in_text_mode_by_language(tmp_path, capsys):
    # en: ref 1 "hello world it's a wellknown fact" (6 words) vs "hello world its a well known fact":
    # 2 sub + 1 ins = 0.5; ref 2 "Good morning." vs "good morning": 0. Mean of rates: 25%.
    ref = write(tmp_path / "ref_en", ["a Hello, world! It's a well-known fact.", "b Good morning."])
    hyp = write(tmp_path / "hyp_en", ["a hello world its a well known fact", "b good morning"])
    out_json = tmp_path / "en.json"
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--metric", "protocol", "--json", str(out_json)]) == 0
    last = capsys.readouterr().out.strip().split("\n")[-1]
    assert last == ("%WER 25.00 [ 3 / 8, 1 ins, 0 del, 2 sub ] 2 utterances, "
                    "Seed-TTS-eval protocol (en, mean of utterance rates)")
    summary = json.loads(out_json.read_text())["summary"]
    assert summary["corpus_error_rate"] == pytest.approx(3 / 8) and summary["language"] == "en"
    # zh: traditional characters in the transcript are converted; punctuation ignored: 1 insertion / 6.
    ref = write(tmp_path / "ref_zh", ["a 今天，天气很好！"])
    hyp = write(tmp_path / "hyp_zh", ["a 今天天氣很好嗎"])
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--metric", "protocol", "--language", "zh"]) == 0
    assert capsys.readouterr().out.strip().split("\n")[-1].startswith("%CER 16.67 [ 1 / 6, 1 ins, 0 del, 0 sub ]")


def test_per_language_scores_each_utterance_with_its_metric(tmp_path, capsys):
    # en: one wrong word of four (WER 25%); ja: す->し and た inserted over 9 characters; zh: 他/她 are
    # homophones, no pinyin error; a Korean reference without a transcript is missing in its language
    ref = write(tmp_path / "ref", ["a The cat sat down.", "b 今日は良い天気です。", "c 他一丁七", "d 안녕하세요"])
    hyp = write(tmp_path / "hyp", ["a the cat sat up", "b 今日は良い天気でした", "c 她一丁七"])
    out_json = tmp_path / "wer.json"
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--per-language", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out.strip().split("\n")
    assert printed[-5:-1] == ["en %WER 25.00 [ 1 / 4 ] 1 utterances", "ja %CER 22.22 [ 2 / 9 ] 1 utterances",
                              "ko %CER n/a [ 0 / 0 ] 0 utterances, 1 missing", "zh %PER 0.00 [ 0 / 4 ] 1 utterances"]
    assert printed[-1].startswith("%PER 17.65 [ 3 / 17,")  # every utterance together, as before
    payload = json.loads(out_json.read_text())
    by_language = payload["summary"]["by_language"]
    assert by_language["en"]["error_rate"] == pytest.approx(0.25) and by_language["en"]["label"] == "WER"
    assert by_language["ja"]["error_rate"] == pytest.approx(2 / 9) and by_language["ko"]["missing_count"] == 1
    assert [u["language"] for u in payload["utterances"]] == ["en", "ja", "zh"]


def test_languages_file_overrides_detection_and_unknown_ones_are_errors(tmp_path, capsys):
    ref = write(tmp_path / "ref", ["a 他一丁七"])
    hyp = write(tmp_path / "hyp", ["a 她一丁七"])
    langs = write(tmp_path / "langs", ["a ja"])
    out_json = tmp_path / "wer.json"
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--languages", langs, "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["summary"]["by_language"]["ja"]["error_rate"] == pytest.approx(0.25)
    # without per-utterance languages nothing changes: no by_language
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--json", str(out_json)]) == 0
    assert "by_language" not in json.loads(out_json.read_text())["summary"]
    capsys.readouterr()
    write(tmp_path / "langs", ["a klingon"])
    assert compute_wer.main(["--ref", ref, "--hyp", hyp, "--languages", langs]) == 1
    error = capsys.readouterr().err
    assert "langs" in error and "utterance 'a'" in error and "'klingon'" in error
