"""ttsrl.evaluation.summary, and scripts/summarize_eval.py over it."""
import json

import pytest

from tests.cli import run_script
from ttsrl.evaluation.summary import EvalError, summarize


def fake_result(folder, error_rate, per, utterances=7, missing=(), label="CER", sim=None, bad_prompt=()):
    folder.mkdir(parents=True)
    summary = {"metric": "protocol", "label": label, "error_rate": error_rate, "utterances": utterances,
               "missing": list(missing), "bad_prompt": list(bad_prompt)}
    if sim is not None:
        summary["speaker_similarity_mean"] = sim
    (folder / "wer.json").write_text(json.dumps({"summary": summary}))
    (folder / "per.json").write_text(json.dumps({"summary": {"error_rate": per}}))


def test_table_plot_and_best_from_two_checkpoints(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    fake_result(tmp_path / "step_200", 0.05, 0.03, missing=["u3"], bad_prompt=["u9"])
    fake_result(tmp_path / "step_100", 0.07, 0.05)
    (tmp_path / "step_300").mkdir()  # not scored yet: ignored
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| step | CER % | pinyin ER % | utterances | missing | bad prompts |" in out
    assert "| 200 (best) | 5.00 | 3.00 | 7 | 1 | 1 |" in out and "| 0 | 12.00 | 8.00 | 7 | 0 | 0 |" in out
    assert out.index("| 0 |") < out.index("| 100 |") < out.index("| 200 (best)")
    assert "best checkpoint by cer: step 200 (CER 5.00%)" in out
    assert (tmp_path / "best_step.txt").read_text() == "200\n"
    tsv = (tmp_path / "cer_by_step.tsv").read_text().splitlines()
    assert tsv[0] == "step\tcer\tper\tutterances\tmissing\tbad_prompt" and tsv[1] == "0\t0.120000\t0.080000\t7\t0\t0"
    png = (tmp_path / "cer_by_step.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_ties_go_to_the_earlier_step(tmp_path):
    fake_result(tmp_path / "step_0", 0.05, 0.05)
    fake_result(tmp_path / "step_100", 0.05, 0.04)
    assert summarize(tmp_path)["best"]["step"] == 0


def test_the_user_chooses_the_metric_that_picks_the_best_step(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.10, 0.02, sim=0.70)   # best pinyin
    fake_result(tmp_path / "step_100", 0.04, 0.06, sim=0.65)  # best CER
    fake_result(tmp_path / "step_200", 0.08, 0.05, sim=0.75)  # best SIM
    assert summarize(tmp_path)["best"]["step"] == 100
    assert summarize(tmp_path, "pinyin")["best"]["step"] == 0
    assert summarize(tmp_path, "sim")["best"]["step"] == 200
    assert (tmp_path / "best_step.txt").read_text() == "200\n"
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path), "--select-by", "sim"]) == 0
    assert "best checkpoint by sim: step 200 (CER 8.00%, SIM 0.7500)" in capsys.readouterr().out


def test_an_english_set_reports_wer(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.031, 0.02, label="WER")
    fake_result(tmp_path / "step_10", 0.025, 0.02, label="WER")
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path), "--select-by", "wer"]) == 0
    out = capsys.readouterr().out
    assert "| step | WER % |" in out and "| 10 (best) | 2.50 |" in out
    assert (tmp_path / "cer_by_step.tsv").read_text().startswith("step\twer\tper\t")
    fake_result(tmp_path / "step_20", 0.01, 0.01, label="CER")
    with pytest.raises(EvalError, match="different metrics"):
        summarize(tmp_path)


def test_nothing_to_summarize_is_an_error(tmp_path, capsys):
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path)]) == 1
    assert "no step_N/wer.json found" in capsys.readouterr().err
    (tmp_path / "step_5").mkdir()
    (tmp_path / "step_5" / "wer.json").write_text("{")
    with pytest.raises(EvalError, match="unreadable"):
        summarize(tmp_path)


def test_selecting_by_sim_without_similarity_is_an_error(tmp_path):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    with pytest.raises(EvalError, match="no step has a sim score"):
        summarize(tmp_path, "sim")


def test_speaker_similarity_column_when_scored(tmp_path, capsys):
    fake_result(tmp_path / "step_0", 0.12, 0.08)
    fake_result(tmp_path / "step_100", 0.05, 0.03, sim=0.81234)
    assert run_script("summarize_eval", ["--eval-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| step | CER % | pinyin ER % | SIM | utterances | missing | bad prompts |" in out
    assert "| 100 (best) | 5.00 | 3.00 | 0.8123 | 7 | 0 | 0 |" in out and "| 0 | 12.00 | 8.00 | - | 7 | 0 | 0 |" in out
    tsv = (tmp_path / "cer_by_step.tsv").read_text().splitlines()
    assert tsv == ["step\tcer\tper\tsim\tutterances\tmissing\tbad_prompt", "0\t0.120000\t0.080000\t\t7\t0\t0",
                   "100\t0.050000\t0.030000\t0.812340\t7\t0\t0"]
