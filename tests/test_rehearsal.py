"""bash run.sh --rehearse: configs/default.sh itself, the profile a GPU user runs, stage by stage on this
CPU machine (issue 25).

Every stage is its own `bash run.sh --rehearse --config FILE N N` process with nothing exported beyond what
a user's shell has (PATH, HOME, ...), as users run stages; the config file is what a user writes: the
default profile with other ports (and here a CosyVoice checkout and a rehearsal root of the test's own).
The rehearsal changes only what a CPU machine forces and says so first: tiny random models of the real
architectures built instead of downloaded (the real CosyVoice2 engines run on them), a Seed-TTS-eval
stand-in, the CPU platform, fewer steps and smaller batches and evaluation sets. Before stage 2 the GPU
command at the config's real sizes (8 GPUs) passes veRL's own validation and its actor builds with the
command's attention.

One rehearsal root serves the module: configs/default.sh (CosyVoice2, GRPO) through stages -1..6; then
train_algorithm=dpo through stages 2..3 on the same models, data and reward server; then
model_family=cosyvoice3 through stages -1..6 (its own tiny CosyVoice3 with the real CosyVoice3 engines,
its own server; eval_similarity=false). The CosyVoice3 rehearsal took over what the smoke run's
CosyVoice3 variant checked (the family through every stage, its export, the wrong-family refusal).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.reward_utils import port_is_free
from token2wav_server.launch import free_ports

REPO = Path(__file__).resolve().parents[1]
USER_SHELL = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "TMPDIR")
"""What a user's login shell has; nothing else reaches a stage (no PYTHONPATH, no REWARD_SERVER_URL)."""
STAGE_TIMEOUT = 1800


def user_shell() -> dict:
    return {name: os.environ[name] for name in USER_SHELL if name in os.environ}


def write_config(path: Path, base: Path | str = "configs/default.sh", **settings) -> Path:
    """A user's config file: some settings, in configs/default.sh's form (a variable set in the
    environment wins), then the profile it builds on."""
    def quoted(value) -> str:  # inside "${name=...}": escape what double quotes interpret
        return "".join("\\" + c if c in '"$`\\' else c for c in str(value))

    lines = [f': "${{{name}={quoted(value)}}}"' for name, value in settings.items()]
    path.write_text("\n".join(lines + [f"source {base}"]) + "\n")
    return path


def rehearse(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "run.sh", "--rehearse", "--config", str(config), *args], cwd=REPO,
                          env=user_shell(), capture_output=True, text=True, timeout=STAGE_TIMEOUT)
    if check:
        assert done.returncode == 0, f"run.sh --rehearse {' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def rehearse_stages(config: Path, first: int, last: int) -> dict[int, subprocess.CompletedProcess]:
    """Each stage in its own process, as users run them (the seconds each took are printed)."""
    outputs, seconds = {}, {}
    for stage in range(first, last + 1):
        began = time.monotonic()
        outputs[stage] = rehearse(config, str(stage), str(stage))
        seconds[stage] = round(time.monotonic() - began)
    print(f"rehearsal of {config.name}, seconds per stage: {seconds}")
    return outputs


def metrics_steps(exp: Path) -> dict[int, dict]:
    lines = [json.loads(line) for path in (exp / "metrics").glob("*.jsonl") for line in path.read_text().splitlines()]
    return {line["step"]: line["data"] for line in lines}


@dataclasses.dataclass
class Rehearsal:
    root: Path  # the rehearsal root: every output and download
    config: Path
    cosyvoice_src: Path
    ports: dict
    outputs: dict[int, subprocess.CompletedProcess]

    def path(self, relative: str) -> Path:
        return self.root / relative


REAL_RUN_PATHS = ("exp/cosyvoice2_grpo", "exp/cosyvoice2_dpo", "exp/cosyvoice3_grpo", "data/cosyvoice2",
                  "data/cosyvoice3", "data/seedtts_testset", "pretrained_models")


@pytest.fixture(scope="module")
def cosyvoice_checkout() -> Path:
    from ttsrl.cosyvoice_source import find_cosyvoice_source

    return find_cosyvoice_source()


@pytest.fixture(scope="module")
def default_rehearsal(tmp_path_factory, cosyvoice_checkout):
    """configs/default.sh, stages -1..6, each its own process; the reward server stays up for the DPO
    rehearsal and is stopped at the end of the module."""
    scratch = tmp_path_factory.mktemp("rehearsal")
    http, grpc, metrics, master = free_ports(4)
    ports = {"http_port": http, "grpc_port": grpc, "metrics_port": metrics, "eval_master_port": master}
    config = write_config(scratch / "my_cluster.sh", cosyvoice_src=cosyvoice_checkout,
                          rehearsal_root=scratch / "rehearsal", **ports)
    before = {name: (REPO / name).exists() for name in REAL_RUN_PATHS}
    try:
        outputs = rehearse_stages(config, -1, 6)
        yield Rehearsal(scratch / "rehearsal", config, cosyvoice_checkout, ports, outputs)
    finally:
        rehearse(config, "--stop-server", check=False)
        # nothing of the rehearsal lands where a real run's outputs go
        assert {name: (REPO / name).exists() for name in REAL_RUN_PATHS} == before


@pytest.mark.slow
def test_the_default_profile_rehearses_every_stage_on_the_cpu(default_rehearsal):
    r = default_rehearsal
    listing = r.outputs[-1].stdout
    # the list of changes, each with its reason, then what stays the config's
    for change in ("model_source: 'modelscope' -> 'tiny'", "train_device: 'cuda' -> 'cpu'",
                   "train_file: 'data/raw/train.jsonl' -> 'assets/zh_texts.jsonl'", "n_gpus_per_node: '8' -> '1'",
                   "train_batch_size: '32' -> '1'", "exp_dir: 'exp/cosyvoice2_grpo' -> ",
                   "eval_manifest: 'data/seedtts_testset/zh/meta.lst' -> ",
                   "actor_rollout_ref.actor.strategy=fsdp2: FSDP1 needs an accelerator"):
        assert change in listing, change
    changes = [line for line in listing.splitlines() if "' -> '" in line]
    assert changes and all(len(line.split("': ", 1)[1].split()) >= 4 for line in changes)  # a reason each
    assert "Unchanged, the config's: reward_preset=intelligibility, " \
           "server_engines=token2wav_server.engines_cosyvoice2:create_engines" in listing

    # stage -1: tiny models of the real architectures where the downloads would land, a test-set stand-in
    pretrained = r.path("pretrained_models")
    for built in ("CosyVoice2-0.5B/flow.pt", "CosyVoice2-0.5B/hift.pt", "CosyVoice2-0.5B/speech_tokenizer_v2.onnx",
                  "SenseVoiceSmall/model.pt", "paraformer-zh/model.pt", "whisper/large-v3.pt",
                  "wavlm_large_finetune.pth", "cosyvoice2_llm_hf/config.json"):
        assert (pretrained / built).is_file(), built
    meta = r.path("data/seedtts_testset/zh/meta.lst").read_text().splitlines()
    assert len(meta) == 4 and all((r.path("data/seedtts_testset/zh") / row.split("|")[2]).is_file() for row in meta)

    # stage 0: a dev slice held out of training (defect 5), in the family's own data folder (defect 4)
    data = r.path("data/cosyvoice2")
    dev = [json.loads(line) for line in (data / "dev.jsonl").read_text().splitlines()]
    assert len(dev) == 2
    assert json.loads((data / "run.json").read_text())["model_family"] == "cosyvoice2"

    # stage 2: before training, the GPU command at the real sizes passed veRL's validation at 8 GPUs and its
    # actor built with the command's attention (defect 1); it passes the family to every Ray worker (defect 3)
    stage2 = r.outputs[2].stdout
    assert "veRL validation passed at world size 8 (cuda): 32 prompts x 4 responses per step" in stage2
    assert "attn_implementation=sdpa" in stage2
    exp = r.path("exp/cosyvoice2_grpo")
    job = yaml.safe_load((exp / "logs" / "gpu_job_config.yaml").read_text())
    assert job["trainer"]["n_gpus_per_node"] == 8 and job["trainer"]["device"] == "cuda"
    assert job["actor_rollout_ref"]["model"]["override_config"]["attn_implementation"] == "sdpa"
    assert job["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"]["TTSRL_MODEL_FAMILY"] == "cosyvoice2"
    steps = metrics_steps(exp)
    assert [s for s in sorted(steps) if "actor/grad_norm" in steps[s]] == [1, 2]  # real GRPO steps
    assert json.loads((exp / "run.json").read_text()) == {"kind": "experiment", "model_family": "cosyvoice2",
                                                         "train_algorithm": "grpo"}

    # stages 3-6, each run alone: stage 4 scored against the config's own port (defect 2: alone, it used
    # to score against 127.0.0.1:8001, where nothing listens here) and chose the best step on the dev set
    assert (exp / "global_step_2" / "merged_hf_model" / "merge_complete.json").is_file()
    for scored in ("eval/dev/step_0", "eval/dev/step_2", "eval/step_0", "eval/step_2"):
        assert (exp / scored / "wer.json").is_file(), scored
    summary = json.loads((exp / "eval" / "summary.json").read_text())
    assert summary["selected_on"] == "dev" and sorted(row["step"] for row in summary["steps"]) == [0, 2]
    assert json.loads((exp / "eval" / "step_2" / "wer.json").read_text())["summary"]["speaker_similarity_mean"] > 0
    best = summary["best_step"]
    assert (exp / "synth" / f"step_{best}.wav").is_file()
    assert (exp / "global_step_2" / "llm.pt").is_file()  # stage 6: the best, or the latest when the base won


@pytest.mark.slow
def test_dpo_rehearses_in_its_own_folder_on_the_same_models_data_and_server(default_rehearsal):
    r = default_rehearsal
    config = write_config(r.config.with_name("my_dpo.sh"), base=r.config, train_algorithm="dpo")
    outputs = rehearse_stages(config, 2, 3)
    assert "stage 2: DPO on the CPU" in outputs[2].stdout
    assert "dpo_max_chosen_error: '0.05' -> '1000000'" in outputs[2].stdout  # the pair rule on noise, said
    exp = r.path("exp/cosyvoice2_dpo")
    trained = json.loads((exp / "dpo" / "round_1" / "trained.json").read_text())
    merged = exp / f"global_step_{trained['step']}" / "merged_hf_model"
    assert (merged / "merge_complete.json").is_file()
    assert json.loads((exp / "run.json").read_text())["train_algorithm"] == "dpo"
    assert not (r.path("exp/cosyvoice2_grpo") / "dpo").exists()
    # a DPO run pointed at the GRPO run's folder stops before writing, naming both (defect 4)
    clash = write_config(r.config.with_name("clash.sh"), base=r.config, train_algorithm="dpo",
                         exp_dir=r.path("exp/cosyvoice2_grpo"))
    refused = rehearse(clash, "3", "3", check=False)
    assert refused.returncode == 1
    assert "holds the outputs of another run (model_family=cosyvoice2, train_algorithm=grpo" in refused.stderr
    assert "this run is model_family=cosyvoice2, train_algorithm=dpo" in refused.stderr


@pytest.mark.slow
def test_cosyvoice3_rehearses_every_stage_with_its_real_engines_and_exports_its_llm_pt(default_rehearsal):
    """model_family=cosyvoice3 through every stage: a complete tiny Fun-CosyVoice3 (LLM side and the
    real CosyVoice3 token2wav classes), its own data and experiment folders, 2 GRPO steps, export to a
    CosyVoice3 llm.pt; eval_similarity=false in the config reaches stage 4 run alone (defect 2). Then a
    CosyVoice2 model directory given as cosyvoice3_dir, and CosyVoice2's data folder, are refused."""
    import torch

    from ttsrl.model_family import family_of_hf_dir, family_of_llm_state_dict

    r = default_rehearsal
    rehearse(r.config, "--stop-server")  # the CosyVoice2 server: this family serves its own engines
    http, grpc, metrics, master = free_ports(4)
    ports = {"http_port": http, "grpc_port": grpc, "metrics_port": metrics, "eval_master_port": master}
    config = write_config(r.config.with_name("my_cv3.sh"), base="configs/default.sh", model_family="cosyvoice3",
                          eval_similarity="false", cosyvoice_src=r.cosyvoice_src, rehearsal_root=r.root, **ports)
    outputs = rehearse_stages(config, -1, 6)
    try:
        assert all("model_family=cosyvoice3" in done.stdout for done in outputs.values())
        # only the family's own model is built: the ASR models of the CosyVoice2 rehearsal are reused
        assert re.search(r"building tiny random models from the real classes \(model_source=tiny; no download\): "
                         r"cosyvoice3 \(LLM, flow, HiFT, ONNX stand-ins\)$", outputs[-1].stdout, re.MULTILINE)
        assert family_of_hf_dir(r.path("pretrained_models/cosyvoice3_llm_hf")).name == "cosyvoice3"
        assert (r.path("pretrained_models/Fun-CosyVoice3-0.5B-2512") / "speech_tokenizer_v3.onnx").is_file()
        assert "token2wav_server.engines_cosyvoice3:create_engines" in outputs[1].stdout
        exp = r.path("exp/cosyvoice3_grpo")
        steps = metrics_steps(exp)
        assert [s for s in sorted(steps) if "actor/grad_norm" in steps[s]] == [1, 2]
        job = yaml.safe_load((exp / "logs" / "gpu_job_config.yaml").read_text())
        assert job["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"]["TTSRL_MODEL_FAMILY"] == "cosyvoice3"
        assert family_of_hf_dir(exp / "global_step_2" / "merged_hf_model").name == "cosyvoice3"
        summary = json.loads((exp / "eval" / "summary.json").read_text())
        assert sorted(row["step"] for row in summary["steps"]) == [0, 2]
        scored = json.loads((exp / "eval" / "step_2" / "wer.json").read_text())
        assert "speaker_similarity_mean" not in scored["summary"]  # eval_similarity=false, from the config file
        exported = torch.load(exp / "global_step_2" / "llm.pt", map_location="cpu", weights_only=True)
        assert family_of_llm_state_dict(exported).name == "cosyvoice3"
        assert list((exp / "synth").glob("step_*.wav"))
        assert json.loads(r.path("data/cosyvoice3/run.json").read_text())["model_family"] == "cosyvoice3"
    finally:
        rehearse(config, "--stop-server", check=False)
    assert not (exp / "reward_server.pid").exists()
    assert all(port_is_free(port) for name, port in ports.items() if name != "eval_master_port")

    # a CosyVoice2 llm.pt under model_family=cosyvoice3 is refused, naming both families; nothing converted
    wrong = write_config(r.config.with_name("wrong.sh"), base=config,
                         cosyvoice3_dir=r.path("pretrained_models/CosyVoice2-0.5B"), hf_model_dir=r.path("wrong_hf"))
    refused = rehearse(wrong, "-1", "-1", check=False)
    assert refused.returncode != 0
    assert "is a cosyvoice2 llm.pt but model_family=cosyvoice3" in refused.stderr, refused.stderr[-2000:]
    assert not r.path("wrong_hf").exists()
    # CosyVoice2's data folder under model_family=cosyvoice3: stage 0 stops, naming both
    shared = write_config(r.config.with_name("shared_data.sh"), base=config, data_dir=r.path("data/cosyvoice2"))
    clash = rehearse(shared, "0", "0", check=False)
    assert clash.returncode == 1 and "model_family=cosyvoice2" in clash.stderr and "set another data_dir" in clash.stderr


# ---- fast checks of the rehearsal's own refusals ----------------------------------------------------------------

def test_a_batch_eight_gpus_cannot_divide_is_caught_before_stage_2_on_a_laptop(tmp_path):
    """The real-size check runs veRL's own validation on the GPU command at the config's world size
    before anything trains: 33 prompts x 4 responses do not split over 8 GPUs x 1 node."""
    config = write_config(tmp_path / "odd.sh", rehearsal_root=tmp_path / "r", train_batch_size=33,
                          ppo_mini_batch_size=33)
    done = rehearse(config, "2", "2", check=False)
    assert done.returncode == 1
    assert "veRL refuses this job at 8 GPU(s) x 1 node(s)" in done.stderr
    assert "real_train_batch_size (132) must be divisible by minimal possible batch size (8)" in done.stderr
    assert "the GPU run of" in done.stderr and "would fail at start-up" in done.stderr
    assert "train_batch_size: '33' -> '1'" in done.stdout  # the CPU run's own size keeps 1 update per step
    assert not (tmp_path / "r" / "exp" / "cosyvoice2_grpo" / "global_step_1").exists()


def test_a_setting_the_config_forces_is_named_with_the_fix(tmp_path):
    """The rehearsal changes a setting as an environment variable does; a config that assigns it
    unconditionally would silently undo the change, so the rehearsal stops, naming it."""
    config = tmp_path / "plain.sh"
    config.write_text(f"source {REPO / 'configs' / 'default.sh'}\nn_gpus_per_node=8\n")
    done = rehearse(config, "0", "0", check=False)
    assert done.returncode == 1
    assert f"{config} sets n_gpus_per_node to '8' unconditionally" in done.stderr
    assert ": \"${n_gpus_per_node=...}\"" in done.stderr
