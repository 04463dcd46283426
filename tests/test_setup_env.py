"""scripts/setup_env.sh and the requirement sets it installs: the server finds CosyVoice where the config
says ($cosyvoice_src), the install stamp covers every pin (a changed pin reinstalls), and the CUDA and CPU
pin sets of the CosyVoice runtime agree except where requirements-cosyvoice.txt says why not."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAMP_NAME = ".ttsrl-requirements"


# ---- the pin sets -------------------------------------------------------------------------------------------

def pins(*names: str) -> dict[str, str]:
    """package (normalized) -> version over the requirement files `names`; a package pinned twice at
    different versions within one environment's set fails here."""
    found: dict[str, tuple[str, str]] = {}
    for name in names:
        for number, raw in enumerate((REPO / name).read_text().splitlines(), 1):
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line)
            assert match, f"{name}:{number}: not a 'package==version' pin: {raw!r}"
            package = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            where = f"{name}:{number}"
            if package in found:
                assert found[package][0] == match.group(3), \
                    f"{package} pinned twice in one environment: {found[package][1]} and {where}"
            found[package] = (match.group(3), where)
    return {package: version for package, (version, _) in found.items()}


def declared_differences() -> dict[str, str]:
    """The '# differs: PACKAGE  reason' lines of requirements-cosyvoice.txt."""
    text = (REPO / "requirements-cosyvoice.txt").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^# differs: (\S+)\s+(.+)$", text, re.MULTILINE)}


CPU_SET = ("requirements-server.txt", "requirements-cosyvoice-cpu.txt", "requirements-cosyvoice-cpu-nodeps.txt")
CUDA_SET = ("requirements-server.txt", "requirements-cosyvoice.txt")


def test_cuda_and_cpu_server_sets_differ_only_where_they_say_why():
    cpu, cuda, declared = pins(*CPU_SET), pins(*CUDA_SET), declared_differences()
    assert declared, "requirements-cosyvoice.txt has no '# differs:' lines"
    # a CUDA build declared as '<name>-gpu' stands for the CPU set's '<name>', at the same version
    covered = set(declared) | {name[: -len("-gpu")] for name in declared if name.endswith("-gpu")}
    undeclared = [f"{package}: CPU set {cpu.get(package, '(none)')}, CUDA set {cuda.get(package, '(none)')}"
                  for package in sorted(set(cpu) | set(cuda))
                  if cpu.get(package) != cuda.get(package) and package not in covered]
    assert undeclared == []
    for name in declared:
        assert name in cuda, f"'# differs: {name}' names a package the CUDA set does not pin"
        if name.endswith("-gpu"):
            assert cuda[name] == cpu[name[: -len("-gpu")]], f"{name} {cuda[name]} is not the CPU set's version"
    assert set(declared) == {"triton", "onnxruntime-gpu"}


def test_one_gdown_pin_in_the_server_sets():
    assert pins(*CPU_SET)["gdown"] == pins(*CUDA_SET)["gdown"] == "6.5.1"


# ---- the stamp, and where the server looks for CosyVoice --------------------------------------------------

@pytest.fixture()
def repo_copy(tmp_path):
    """The files setup_env.sh reads, in a scratch repository (so a ./CosyVoice can exist there)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("setup_env.sh", "lib.sh"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    shutil.copytree(REPO / "configs", root / "configs")
    for path in [*REPO.glob("requirements*.txt"), REPO / "constraints-cpu.txt"]:
        shutil.copy(path, root / path.name)
    return root


def setup_env(root: Path, *args: str, env: dict | None = None):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("cosyvoice_src", "TTSRL_CONFIG", "TTSRL_DEVICE", "TRAINER_VENV", "SERVER_VENV")}
    return subprocess.run(["bash", str(root / "scripts" / "setup_env.sh"), *args], env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def stamp(root: Path, kind: str, **env) -> str:
    done = setup_env(root, kind, "--print-stamp", env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_server_finds_cosyvoice_in_the_configured_cosyvoice_src(repo_copy, tmp_path):
    (repo_copy / "CosyVoice").mkdir()  # the old hard-wired place: must not be what decides
    elsewhere = tmp_path / "src" / "CosyVoice-pinned"
    missing = setup_env(repo_copy, "server", "--print-stamp",
                        env={"TTSRL_DEVICE": "cuda", "cosyvoice_src": str(elsewhere)})
    assert missing.returncode == 0
    assert "requirements-cosyvoice.txt" not in missing.stdout
    assert f"no CosyVoice source in cosyvoice_src='{elsewhere}'" in missing.stderr
    elsewhere.mkdir(parents=True)
    assert "file requirements-cosyvoice.txt " in stamp(repo_copy, "server", TTSRL_DEVICE="cuda",
                                                       cosyvoice_src=str(elsewhere))
    # the same through a config file (run.sh passes its --config as TTSRL_CONFIG)
    config = tmp_path / "mine.sh"
    config.write_text(f'cosyvoice_src={elsewhere}\nsource configs/default.sh\n')
    assert "file requirements-cosyvoice.txt " in stamp(repo_copy, "server", TTSRL_DEVICE="cuda",
                                                       TTSRL_CONFIG=str(config))
    # the default: CosyVoice under the repository root
    assert "file requirements-cosyvoice.txt " in stamp(repo_copy, "server", TTSRL_DEVICE="cuda")


def test_stamp_names_every_pin_and_file(repo_copy):
    cpu_trainer = stamp(repo_copy, "trainer", TTSRL_DEVICE="cpu").splitlines()
    assert cpu_trainer[:2] == ["device cpu", "pin torch==2.13.0"]
    assert [line.split()[1] for line in cpu_trainer[2:]] == [
        "requirements.txt", "constraints-cpu.txt", "requirements-trainer-cpu.txt"]
    assert "pin verl[vllm]==0.9.1" in stamp(repo_copy, "trainer", TTSRL_DEVICE="cuda").splitlines()
    assert "pin torch==2.11.0" in stamp(repo_copy, "server", TTSRL_DEVICE="cuda").splitlines()
    cpu_server = stamp(repo_copy, "server", TTSRL_DEVICE="cpu")
    assert "file requirements-cosyvoice-cpu.txt " in cpu_server
    assert "file requirements-cosyvoice-cpu-nodeps.txt " in cpu_server


def test_a_changed_pin_reinstalls(repo_copy, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "pip_calls.txt"
    # the environment's python: records what setup_env.sh asks it to install, and fails (installs nothing)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexit 1\n")
    (venv / "bin" / "python").chmod(0o755)
    env = {"TTSRL_DEVICE": "cpu", "SERVER_VENV": str(venv)}
    (venv / STAMP_NAME).write_text(stamp(repo_copy, "server", **env))

    current = setup_env(repo_copy, "server", env=env)
    assert current.returncode == 0 and "is up to date (cpu)" in current.stdout
    assert not calls.exists()

    requirements = repo_copy / "requirements-cosyvoice-cpu.txt"
    requirements.write_text(requirements.read_text().replace("gdown==6.5.1", "gdown==5.2.0"))
    changed = setup_env(repo_copy, "server", env=env)
    assert changed.returncode == 1
    assert "-m pip install" in calls.read_text() and "torch==2.13.0" in calls.read_text()
    assert not (venv / STAMP_NAME).exists()  # removed before installing: a failed install is never "up to date"


def test_bad_device_and_option_are_refused(repo_copy):
    bad = setup_env(repo_copy, "server", "--print-stamp", env={"TTSRL_DEVICE": "gpu"})
    assert bad.returncode == 1 and "TTSRL_DEVICE must be cpu or cuda, got 'gpu'" in bad.stderr
    option = setup_env(repo_copy, "server", "--frobnicate")
    assert option.returncode == 1 and "unknown option '--frobnicate'" in option.stderr


def test_cuda_12_8_wheels_for_drivers_older_than_580(repo_copy):
    """cuda_wheels=cu128 (issue 25): torch 2.11.0 from PyTorch's CUDA 12.8 index and vLLM's cu128 release
    asset of the pinned version, installed first, then the rest; the stamp records the choice."""
    trainer = setup_env(repo_copy, "trainer", "--print-commands", env={"TTSRL_DEVICE": "cuda", "cuda_wheels": "cu128"})
    lines = trainer.stdout.splitlines()
    assert lines[0] == "pip install torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
    assert "/v0.24.0/vllm-0.24.0+cu128-cp38-abi3-manylinux_2_28_" in lines[1]
    assert lines[2].startswith("pip install verl[vllm]==0.9.1 -r requirements.txt")
    default = setup_env(repo_copy, "trainer", "--print-commands", env={"TTSRL_DEVICE": "cuda"})
    assert default.stdout.splitlines() == ["pip install verl[vllm]==0.9.1 -r requirements.txt"]
    assert "cuda_wheels cu128" in stamp(repo_copy, "server", TTSRL_DEVICE="cuda", cuda_wheels="cu128").splitlines()
    assert "cuda_wheels cu130" in stamp(repo_copy, "server", TTSRL_DEVICE="cuda").splitlines()
    bad = setup_env(repo_copy, "server", "--print-stamp", env={"TTSRL_DEVICE": "cuda", "cuda_wheels": "cu118"})
    assert bad.returncode == 1 and "cuda_wheels must be cu130 (driver >= 580) or cu128" in bad.stderr
