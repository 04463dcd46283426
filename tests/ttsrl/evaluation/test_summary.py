"""ttsrl.evaluation.summary, and scripts/summarize_eval.py over it."""
import json

import pytest

from tests.cli import run_script
from ttsrl.evaluation.summary import TEST_SELECTION_WARNING, EvalError, summarize


def fake_result(folder, error_rate, per, utterances=7, missing=(), label="CER", sim=None, bad_prompt=(),
                by_language=None):
    folder.mkdir(parents=True)
    summary = {"metric": "protocol", "label": label, "error_rate": error_rate, "utterances": utterances,
               "missing": list(missing), "missing_count": len(missing), "bad_prompt": list(bad_prompt)}
    if sim is not None:
        summary["speaker_similarity_mean"] = sim
    if by_language is not None:  # language -> (label, error rate), as ttsrl.evaluation.wer writes it
        summary["by_language"] = {language: {"label": part_label, "error_rate": rate, "corpus_error_rate": rate,
                                             "errors": 1, "ref_length": 10, "utterances": 1, "missing_count": 0}
                                  for language, (part_label, rate) in by_language.items()}
    (folder / "wer.json").write_text(json.dumps({"summary": summary}))
    (folder / "per.json").write_text(json.dumps({"summary": {"error_rate": per}}))


def test_table_plot_and_best_from_two_checkpoints(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    fake_result(tmp_path / "step_200", 0.05, 0.03, missing=["u3"], bad_prompt=["u9"])
    fake_result(tmp_path / "step_100", 0.07, 0.05)
    (tmp_path / "step_300").mkdir()  # not scored yet: ignored
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert ("| step | test CER % | test pinyin ER % | test utterances | test missing | test bad prompts | "
            "selection |" in out)
    # step 200 reads best (5%) by leaving out an utterance it has no audio for, which step 0 has:
    # it cannot be chosen, and the table says why
    assert "| 200 | 5.00 | 3.00 | 7 | 1 | 1 | excluded: 1 missing > step 0's 0 |" in out
    assert "| 0 | 12.00 | 8.00 | 7 | 0 | 0 |  |" in out and "| 100 (best) | 7.00 | 5.00 | 7 | 0 | 0 | best |" in out
    assert out.index("| 0 |") < out.index("| 100 (best)") < out.index("| 200 |")
    assert "best checkpoint by cer on the test set: step 100 (test CER 7.00%)" in out
    assert "step(s) 200 cannot be chosen" in captured.err
    assert (tmp_path / "best_step.txt").read_text() == "100\n"
    tsv = (tmp_path / "cer_by_step.tsv").read_text().splitlines()
    assert tsv[0] == "step\ttest_cer\ttest_per\ttest_utterances\ttest_missing\ttest_bad_prompt\tbest"
    assert tsv[1] == "0\t0.120000\t0.080000\t7\t0\t0\t0" and tsv[2].endswith("\t1")
    png = (tmp_path / "cer_by_step.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # the user may allow it: then the chosen step's missing audio is said
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path), "--allow-missing"]) == 0
    captured = capsys.readouterr()
    assert "best checkpoint by cer on the test set: step 200 (test CER 5.00%, 1 missing)" in captured.out
    assert "the chosen step 200 has 1 test utterance(s) without audio" in captured.err


def test_zero_shot_selection_follows_error_rate_and_similarity(tmp_path):
    """The main job's case (issue 26): dev CER 4.17% at step 8 but SIM 0.58, 6.25% and SIM 0.92 at
    step 16. cer picks step 8; cer_sim passes over the step that lost the voice."""
    fake_result(tmp_path / "step_0", 0.08, 0.05, sim=0.60)
    fake_result(tmp_path / "step_8", 0.0417, 0.03, sim=0.58)
    fake_result(tmp_path / "step_16", 0.0625, 0.04, sim=0.92)
    fake_result(tmp_path / "step_24", 0.0700, 0.05, sim=0.91)  # within the tolerance, but a higher CER
    assert summarize(tmp_path, "cer")["best_step"] == 8
    result = summarize(tmp_path, "cer_sim")
    assert result["best_step"] == 16
    assert "among the steps whose SIM is within 0.02 of the best" in result["table"]
    assert summarize(tmp_path, "cer_sim", sim_tolerance=0.5)["best_step"] == 8  # a loose tolerance: CER decides


def test_cer_sim_without_similarity_falls_back_to_the_error_rate_and_says_so(tmp_path):
    fake_result(tmp_path / "step_0", 0.08, 0.05)
    fake_result(tmp_path / "step_8", 0.05, 0.03)
    result = summarize(tmp_path, "cer_sim")
    assert result["best_step"] == 8
    assert any("without SIM scores" in warning for warning in result["warnings"])


def test_without_a_dev_set_the_test_set_selects_and_every_output_warns(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    fake_result(tmp_path / "step_8", 0.05, 0.03)
    for argv in ([], ["--dev-dir", str(tmp_path / "dev")]):  # no flag, or a dev dir that does not exist
        assert run_script("summarize_eval", ["--eval-dir", str(tmp_path), *argv]) == 0
        captured = capsys.readouterr()
        assert f"warning: {TEST_SELECTION_WARNING}" in captured.out and TEST_SELECTION_WARNING in captured.err
        assert "best step: 8, chosen on the test set by cer (lowest CER)" in captured.out
        assert TEST_SELECTION_WARNING in (tmp_path / "cer_by_step.md").read_text()
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert (summary["selected_on"], summary["best_step"], summary["select_by"]) == ("test", 8, "cer")
        assert summary["warnings"][0].startswith(TEST_SELECTION_WARNING)
        assert [s["step"] for s in summary["steps"]] == [0, 8] and summary["steps"][0]["dev"] is None
    assert "--dev-dir" in summary["warnings"][0] and "does not exist" in summary["warnings"][0]
    (tmp_path / "dev").mkdir()  # exists but holds no scored step yet: still the test set, and why
    assert summarize(tmp_path, dev_dir=tmp_path / "dev")["warnings"][0].endswith("has no step_N/wer.json)")


def test_the_dev_set_picks_a_step_the_test_set_would_not(tmp_path, capsys):
    test, dev = tmp_path / "eval", tmp_path / "eval" / "dev"
    fake_result(test / "step_0", 0.12, 0.08, sim=0.60)
    fake_result(test / "step_8", 0.04, 0.03, sim=0.62)   # the test set's best
    fake_result(test / "step_16", 0.06, 0.04, sim=0.70)
    fake_result(dev / "step_0", 0.20, 0.10, utterances=5, sim=0.50)
    fake_result(dev / "step_8", 0.09, 0.06, utterances=5, sim=0.55)
    fake_result(dev / "step_16", 0.07, 0.05, utterances=5, sim=0.66)  # the dev set's best
    assert summarize(test)["best_step"] == 8  # what selecting on the test set would give
    assert run_script("summarize_eval", ["--eval-dir", str(test), "--dev-dir", str(dev)]) == 0
    captured = capsys.readouterr()
    assert (test / "best_step.txt").read_text() == "16\n"
    assert TEST_SELECTION_WARNING not in captured.out + captured.err
    assert ("| step | dev CER % | dev pinyin ER % | dev SIM | dev utterances | dev missing | dev bad prompts | "
            "test CER % | test pinyin ER % | test SIM | test utterances | test missing | test bad prompts |") in captured.out
    assert "| 16 (best) | 7.00 | 5.00 | 0.6600 | 5 | 0 | 0 | 6.00 | 4.00 | 0.7000 | 7 | 0 | 0 |" in captured.out
    assert "best step: 16, chosen on the dev set by cer (lowest CER); the test columns report it" in captured.out
    assert ("best checkpoint by cer on the dev set: step 16 (dev CER 7.00%, SIM 0.6600; test CER 6.00%, "
            "SIM 0.7000)") in captured.out
    summary = json.loads((test / "summary.json").read_text())
    assert (summary["selected_on"], summary["best_step"], summary["dev_dir"]) == ("dev", 16, str(dev))
    assert summary["best"]["test"]["error_rate"] == 0.06 and summary["best"]["dev"]["error_rate"] == 0.07
    assert summary["warnings"] == []
    tsv = (test / "cer_by_step.tsv").read_text().splitlines()
    assert tsv[0].startswith("step\tdev_cer\tdev_per\tdev_sim\t") and "\ttest_cer\t" in tsv[0]
    assert tsv[3].startswith("16\t0.070000\t0.050000\t0.660000\t5\t0\t0\t0.060000\t") and tsv[3].endswith("\t1")
    # the dev set selects by every metric
    assert summarize(test, "sim", dev)["best_step"] == 16
    assert summarize(test, "pinyin", dev)["best_step"] == 16
    fake_result(dev / "step_24", 0.01, 0.01, utterances=5)  # chosen on dev, never run on the test set
    with pytest.raises(EvalError, match=r"step 24 was chosen on the dev set by cer but has no test score "
                                        r"\(.*eval/step_24/wer.json is missing\).*remove .*dev/step_24"):
        summarize(test, dev_dir=dev)
    assert (test / "best_step.txt").read_text() == "16\n"  # nothing rewritten
    assert run_script("summarize_eval", ["--eval-dir", str(test), "--dev-dir", str(dev)]) == 1
    assert "error: step 24 was chosen on the dev set" in capsys.readouterr().err


def test_steps_scored_on_one_set_only_get_dashes(tmp_path, capsys):
    test, dev = tmp_path / "eval", tmp_path / "eval" / "dev"
    fake_result(test / "step_0", 0.12, 0.08)
    fake_result(test / "step_8", 0.10, 0.07)   # not on dev
    fake_result(test / "step_16", 0.06, 0.04)
    fake_result(dev / "step_0", 0.20, 0.10)
    fake_result(dev / "step_16", 0.07, 0.05)
    fake_result(dev / "step_24", 0.30, 0.20)   # not on the test set (and not chosen)
    assert run_script("summarize_eval", ["--eval-dir", str(test), "--dev-dir", str(dev)]) == 0
    captured = capsys.readouterr()
    assert "| 8 | - | - | - | - | - | 10.00 | 7.00 | 7 | 0 | 0 |" in captured.out
    assert "| 24 | 30.00 | 20.00 | 7 | 0 | 0 | - | - | - | - | - |" in captured.out
    assert "| 16 (best) | 7.00 |" in captured.out
    assert "warning: step(s) 24 scored on the dev set only ('-' in the test columns)" in captured.out
    assert "step(s) 8 scored on the test set only" in captured.err
    tsv = (test / "cer_by_step.tsv").read_text().splitlines()
    assert tsv[2] == "8\t\t\t\t\t\t0.100000\t0.070000\t7\t0\t0\t0"


def test_dev_and_test_sets_scored_by_different_metrics(tmp_path, capsys):
    # a zh dev slice of the training prompts (CER) and an en test set (WER): each set's columns
    # carry its own label, cer/wer both mean "the selecting set's published error rate"
    test, dev = tmp_path / "eval", tmp_path / "eval" / "dev"
    fake_result(test / "step_0", 0.031, 0.02, label="WER")
    fake_result(test / "step_10", 0.025, 0.02, label="WER")
    fake_result(dev / "step_0", 0.05, 0.04, label="CER")
    fake_result(dev / "step_10", 0.08, 0.05, label="CER")
    assert run_script("summarize_eval", ["--eval-dir", str(test), "--dev-dir", str(dev), "--select-by", "wer"]) == 0
    out = capsys.readouterr().out
    assert "| step | dev CER % | dev pinyin ER % |" in out and "| test WER % | test pinyin ER % |" in out
    assert "| 0 (best) | 5.00 |" in out and "best step: 0, chosen on the dev set by wer (lowest CER)" in out
    assert json.loads((test / "summary.json").read_text())["labels"] == {"dev": "CER", "test": "WER"}
    assert (test / "cer_by_step.tsv").read_text().startswith("step\tdev_cer\tdev_per\t")
    fake_result(dev / "step_20", 0.01, 0.01, label="WER")  # one set scored two ways: refused
    with pytest.raises(EvalError, match=r"dev: steps were scored with different metrics \['CER', 'WER'\]"):
        summarize(test, dev_dir=dev)


def test_ties_go_to_the_earlier_step(tmp_path):
    fake_result(tmp_path / "step_0", 0.05, 0.05)
    fake_result(tmp_path / "step_100", 0.05, 0.04)
    assert summarize(tmp_path)["best_step"] == 0


def test_the_user_chooses_the_metric_that_picks_the_best_step(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.10, 0.02, sim=0.70)   # best pinyin
    fake_result(tmp_path / "step_100", 0.04, 0.06, sim=0.65)  # best CER
    fake_result(tmp_path / "step_200", 0.08, 0.05, sim=0.75)  # best SIM
    assert summarize(tmp_path)["best_step"] == 100
    assert summarize(tmp_path, "pinyin")["best_step"] == 0
    assert summarize(tmp_path, "sim")["best_step"] == 200
    assert (tmp_path / "best_step.txt").read_text() == "200\n"
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path), "--select-by", "sim"]) == 0
    out = capsys.readouterr().out
    assert "best checkpoint by sim on the test set: step 200 (test CER 8.00%, SIM 0.7500)" in out
    assert "chosen on the test set by sim (highest SIM)" in out


def test_an_english_set_reports_wer(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.031, 0.02, label="WER")
    fake_result(tmp_path / "step_10", 0.025, 0.02, label="WER")
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path), "--select-by", "wer"]) == 0
    out = capsys.readouterr().out
    assert "| step | test WER % |" in out and "| 10 (best) | 2.50 |" in out
    assert (tmp_path / "cer_by_step.tsv").read_text().startswith("step\ttest_wer\ttest_per\t")
    fake_result(tmp_path / "step_20", 0.01, 0.01, label="CER")
    with pytest.raises(EvalError, match="different metrics"):
        summarize(tmp_path)


def test_a_step_without_any_audio_has_no_error_rate_and_is_not_chosen(tmp_path, capsys):
    # every utterance missing: no mean (None), not 0.0 -- it must not win the selection
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    fake_result(tmp_path / "step_8", None, None, utterances=0, missing=[f"u{i}" for i in range(7)])
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 8 | - | - | 0 | 7 | 0 |" in out and "| 0 (best) |" in out


def test_nothing_to_summarize_is_an_error(tmp_path, capsys):
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path)]) == 1
    assert "no step_N/wer.json found" in capsys.readouterr().err
    (tmp_path / "step_5").mkdir()
    (tmp_path / "step_5" / "wer.json").write_text("{")
    with pytest.raises(EvalError, match="unreadable"):
        summarize(tmp_path)


def test_selecting_by_sim_without_similarity_is_an_error(tmp_path):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    with pytest.raises(EvalError, match="no step has a sim score on the test set"):
        summarize(tmp_path, "sim")
    fake_result(tmp_path / "dev" / "step_0", 0.12, 0.08)
    with pytest.raises(EvalError, match="no step has a sim score on the dev set"):
        summarize(tmp_path, "sim", tmp_path / "dev")


def test_speaker_similarity_column_when_scored(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    fake_result(tmp_path / "step_100", 0.05, 0.03, sim=0.81234)
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("| step | test CER % | test pinyin ER % | test SIM | test utterances | test missing | test bad prompts |"
            in out)
    assert "| 100 (best) | 5.00 | 3.00 | 0.8123 | 7 | 0 | 0 |" in out and "| 0 | 12.00 | 8.00 | - | 7 | 0 | 0 |" in out
    tsv = (tmp_path / "cer_by_step.tsv").read_text().splitlines()
    assert tsv == ["step\ttest_cer\ttest_per\ttest_sim\ttest_utterances\ttest_missing\ttest_bad_prompt\tbest",
                   "0\t0.120000\t0.080000\t\t7\t0\t0\t0", "100\t0.050000\t0.030000\t0.812340\t7\t0\t0\t1"]


def test_a_set_scored_per_language_gets_a_column_per_language(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.10, 0.08, by_language={"zh": ("CER", 0.04), "en": ("WER", 0.16)})
    fake_result(tmp_path / "step_10", 0.05, 0.03, by_language={"zh": ("CER", 0.02)})  # no en utterance scored
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("| step | test CER % | test pinyin ER % | test utterances | test missing | test bad prompts | "
            "test en WER % | test zh CER % |") in out
    assert "| 0 | 10.00 | 8.00 | 7 | 0 | 0 | 16.00 | 4.00 |" in out
    assert "| 10 (best) | 5.00 | 3.00 | 7 | 0 | 0 | - | 2.00 |" in out
    tsv = (tmp_path / "cer_by_step.tsv").read_text().splitlines()
    assert tsv[0] == ("step\ttest_cer\ttest_per\ttest_utterances\ttest_missing\ttest_bad_prompt\ttest_en_wer\t"
                      "test_zh_cer\tbest")
    assert tsv[2] == "10\t0.050000\t0.030000\t7\t0\t0\t\t0.020000\t1"
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps[0]["test"]["by_language"]["en"] == {"label": "WER", "error_rate": 0.16, "utterances": 1,
                                                     "missing_count": 0}
    # a set without languages (the dev set here) keeps its usual columns and rows; so does a set
    # of a single declared language (a Seed-TTS-eval zh/ folder): its column would repeat the set's
    fake_result(tmp_path / "dev" / "step_0", 0.2, 0.1)
    fake_result(tmp_path / "dev" / "step_10", 0.1, 0.1, by_language={"zh": ("CER", 0.1)})
    result = summarize(tmp_path, dev_dir=tmp_path / "dev")
    assert "| dev bad prompts | test CER % |" in result["table"] and "dev zh" not in result["table"]
    assert "by_language" not in result["steps"][0]["dev"] and "zh" in result["steps"][1]["dev"]["by_language"]
