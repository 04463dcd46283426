"""scripts/train_dpo.py, the CLI of stage 2's DPO steps: messages and exit codes (the library
behind it is tested in tests/ttsrl/training/test_preference_*.py and test_dpo.py; the whole loop
runs in the smoke test's DPO variant)."""
from __future__ import annotations

import json

import prepare_data
from tests.cli import run_script
from tests.policy_utils import tiny_policy  # noqa: F401 (fixture)
from ttsrl.training import dpo


def stage0(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["一二", "三四", "五六"]))
    assert prepare_data.main(["--train_file", str(texts), "--test_size", "1", "--local_dir", str(tmp_path / "data")]) == 0
    return tmp_path / "data" / "train.parquet"


def test_an_empty_pairs_file_stops_with_the_reason_and_counts(tmp_path, capsys):
    data = stage0(tmp_path)
    exp = tmp_path / "exp"
    round_dir = dpo.round_dir(exp, 1)
    round_dir.mkdir(parents=True)
    samples, scores = [], []
    for index in (0, 1):
        for k in range(2):
            samples.append({"prompt_index": index, "sample": k, "response": f"<|s_{k}|><|eos1|>", "ids": [k],
                            "ended": True})
            scores.append({"prompt_index": index, "sample": k, "score": 0.1 * k, "error_rate": 0.5})
    (round_dir / "samples.rank0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (round_dir / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    code = run_script("train_dpo", ["pairs", "--exp-dir", str(exp), "--data", str(data), "--max-chosen-error", "0.05"])
    assert code == 1
    err = capsys.readouterr().err
    assert "DPO round 1: no preference pair from 2 prompts" in err and "'no_chosen_under_threshold': 2" in err
    assert not (round_dir / "pairs.jsonl").exists()
    # a looser threshold keeps both groups
    assert run_script("train_dpo", ["pairs", "--exp-dir", str(exp), "--data", str(data), "--max-chosen-error", "0.5",
                                    "--val-fraction", "0"]) == 0
    assert len((round_dir / "pairs.jsonl").read_text().splitlines()) == 2


def test_steps_out_of_order_are_named(tmp_path, capsys):
    data = stage0(tmp_path)
    exp = tmp_path / "exp"
    assert run_script("train_dpo", ["train", "--exp-dir", str(exp), "--round", "2", "--start-policy", "x"]) == 2
    assert "round 2 starts from round 1's policy" in capsys.readouterr().err
    code = run_script("train_dpo", ["score", "--exp-dir", str(exp), "--data", str(data), "--server-url", "grpc://x:1"])
    err = capsys.readouterr().err
    assert code == 2 and "no samples in" in err and "run the sample step first" in err


def test_sampling_refuses_a_policy_of_another_family(tmp_path, tiny_policy, monkeypatch, capsys):  # noqa: F811
    data = stage0(tmp_path)
    monkeypatch.setenv("TTSRL_MODEL_FAMILY", "cosyvoice3")  # what run.sh exports for model_family=cosyvoice3
    code = run_script("train_dpo", ["sample", "--exp-dir", str(tmp_path / "exp"), "--data", str(data),
                                    "--start-policy", str(tiny_policy), "--samples-per-prompt", "2"])
    assert code == 2
    assert "is a cosyvoice2 model but model_family=cosyvoice3" in capsys.readouterr().err
    assert not (tmp_path / "exp" / "dpo").exists()
