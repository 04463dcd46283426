import json

import pytest

from scripts import summarize_eval


def fake_result(folder, cer, per, utterances=7, missing=()):
    folder.mkdir(parents=True)
    (folder / "wer.json").write_text(json.dumps({"summary": {"error_rate": cer, "utterances": utterances,
                                                             "missing": list(missing)}}))
    (folder / "per.json").write_text(json.dumps({"summary": {"error_rate": per}}))


def test_table_plot_and_best_from_two_checkpoints(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    fake_result(tmp_path / "step_200", 0.05, 0.03, missing=["u3"])
    fake_result(tmp_path / "step_100", 0.07, 0.05)
    (tmp_path / "step_300").mkdir()  # not scored yet: ignored
    assert summarize_eval.main(["--eval-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 200 (best) | 5.00 | 3.00 | 7 | 1 |" in out and "| 0 | 12.00 | 8.00 | 7 | 0 |" in out
    assert out.index("| 0 |") < out.index("| 100 |") < out.index("| 200 (best)")
    assert (tmp_path / "best_step.txt").read_text() == "200\n"
    tsv = (tmp_path / "cer_by_step.tsv").read_text().splitlines()
    assert tsv[0] == "step\tcer\tper\tutterances\tmissing" and tsv[1] == "0\t0.120000\t0.080000\t7\t0"
    png = (tmp_path / "cer_by_step.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_ties_go_to_the_earlier_step(tmp_path):
    fake_result(tmp_path / "step_0", 0.05, 0.05)
    fake_result(tmp_path / "step_100", 0.05, 0.04)
    assert summarize_eval.summarize(tmp_path)["best"]["step"] == 0


def test_nothing_to_summarize_is_an_error(tmp_path, capsys):
    assert summarize_eval.main(["--eval-dir", str(tmp_path)]) == 1
    assert "no step_N/wer.json found" in capsys.readouterr().err
    (tmp_path / "step_5").mkdir()
    (tmp_path / "step_5" / "wer.json").write_text("{")
    with pytest.raises(summarize_eval.EvalError, match="unreadable"):
        summarize_eval.summarize(tmp_path)


def test_speaker_similarity_column_when_scored(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    fake_result(tmp_path / "step_100", 0.05, 0.03)
    wer = tmp_path / "step_100" / "wer.json"
    payload = json.loads(wer.read_text())
    payload["summary"]["speaker_similarity_mean"] = 0.81234
    wer.write_text(json.dumps(payload))
    assert summarize_eval.main(["--eval-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| step | CER % | pinyin ER % | SIM | utterances | missing |" in out
    assert "| 100 (best) | 5.00 | 3.00 | 0.8123 | 7 | 0 |" in out and "| 0 | 12.00 | 8.00 | - | 7 | 0 |" in out
    tsv = (tmp_path / "cer_by_step.tsv").read_text().splitlines()
    assert tsv == ["step\tcer\tper\tsim\tutterances\tmissing", "0\t0.120000\t0.080000\t\t7\t0",
                   "100\t0.050000\t0.030000\t0.812340\t7\t0"]
