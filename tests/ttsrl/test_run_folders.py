"""ttsrl.run_folders: a folder belongs to one run (issue 25, defect 4: a DPO run after a GRPO run in the
same exp_dir ranked GRPO's steps as its own; a CosyVoice3 run reused CosyVoice2's data)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ttsrl import run_folders

REPO = Path(__file__).resolve().parents[2]


def test_a_free_folder_is_claimed_once_and_the_same_run_may_come_back(tmp_path):
    exp = tmp_path / "exp"
    assert "recorded as this run's" in run_folders.claim(exp, "experiment", "cosyvoice2", "grpo")
    assert json.loads((exp / "run.json").read_text()) == {"kind": "experiment", "model_family": "cosyvoice2",
                                                         "train_algorithm": "grpo"}
    assert "is this run's" in run_folders.claim(exp, "experiment", "cosyvoice2", "grpo")


@pytest.mark.parametrize("family, algorithm, named", [
    ("cosyvoice2", "dpo", "train_algorithm=grpo"), ("cosyvoice3", "grpo", "model_family=cosyvoice2")])
def test_another_runs_folder_stops_naming_both(tmp_path, family, algorithm, named):
    exp = tmp_path / "exp"
    run_folders.claim(exp, "experiment", "cosyvoice2", "grpo")
    before = (exp / "run.json").read_bytes()
    with pytest.raises(run_folders.FolderOwnerError) as error:
        run_folders.claim(exp, "experiment", family, algorithm)
    message = str(error.value)
    assert named in message and f"this run is model_family={family}, train_algorithm={algorithm}" in message
    assert "set another exp_dir" in message and "nothing was written" in message
    assert (exp / "run.json").read_bytes() == before


def test_data_folders_belong_to_a_family(tmp_path):
    data = tmp_path / "data"
    run_folders.claim(data, "data", "cosyvoice2")
    with pytest.raises(run_folders.FolderOwnerError, match=r"data folder .*model_family=cosyvoice2.*set another data_dir"):
        run_folders.claim(data, "data", "cosyvoice3")


def test_a_folder_from_before_run_json_is_recognised_by_its_checkpoints(tmp_path):
    grpo = tmp_path / "old_grpo"
    (grpo / "global_step_100" / "actor").mkdir(parents=True)
    with pytest.raises(run_folders.FolderOwnerError, match="train_algorithm=grpo"):
        run_folders.claim(grpo, "experiment", "cosyvoice2", "dpo")
    assert not (grpo / "run.json").exists()
    dpo = tmp_path / "old_dpo"
    (dpo / "global_step_20" / "hf_model").mkdir(parents=True)
    (dpo / "global_step_20" / "hf_model" / "config.json").write_text(json.dumps({"ttsrl_model_family": "cosyvoice3"}))
    assert run_folders.owner_of(dpo, "experiment") == {"train_algorithm": "dpo", "model_family": "cosyvoice3"}
    run_folders.claim(dpo, "experiment", "cosyvoice3", "dpo")  # the same run: claimed
    assert json.loads((dpo / "run.json").read_text())["train_algorithm"] == "dpo"


def test_a_broken_run_json_names_the_file(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(run_folders.FolderOwnerError, match="run.json cannot be read"):
        run_folders.claim(tmp_path, "data", "cosyvoice2")


def test_the_cli_exits_1_with_the_message(tmp_path):
    run_folders.claim(tmp_path, "experiment", "cosyvoice2", "grpo")
    done = subprocess.run([sys.executable, "-m", "ttsrl.run_folders", "claim", "experiment", str(tmp_path),
                           "--model-family", "cosyvoice2", "--train-algorithm", "dpo"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "train_algorithm=grpo" in done.stderr


def test_default_folders_are_per_family_and_algorithm():
    def folders(**env):
        script = "source configs/default.sh; echo $exp_dir $data_dir $dev_size $eval_select_on"
        clean = {"PATH": "/usr/bin:/bin", **env}
        return subprocess.run(["bash", "-c", script], cwd=REPO, env=clean, capture_output=True, text=True,
                              check=True).stdout.split()

    assert folders() == ["exp/cosyvoice2_grpo", "data/cosyvoice2", "100", "dev"]
    assert folders(model_family="cosyvoice3", train_algorithm="dpo")[:2] == ["exp/cosyvoice3_dpo", "data/cosyvoice3"]
