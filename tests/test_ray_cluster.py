"""Multi-node helpers: the Ray start commands and the SLURM example (no cluster started)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def ray_cluster(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / "ray_cluster.sh"), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_head_and_worker_commands():
    head = ray_cluster("head", "--dry-run", node_ip="10.1.2.3", ray_port="6400", n_gpus_per_node="4")
    assert head.returncode == 0, head.stderr
    assert head.stdout.split()[1:] == ["start", "--head", "--node-ip-address=10.1.2.3", "--port=6400",
                                       "--num-gpus=4"]
    worker = ray_cluster("worker", "10.1.2.3", "--block", "--dry-run", node_ip="10.1.2.4", ray_port="6400",
                         n_gpus_per_node="4")
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.split()[1:] == ["start", "--address=10.1.2.3:6400", "--node-ip-address=10.1.2.4",
                                         "--num-gpus=4", "--block"]


def test_worker_without_head_address_is_refused():
    result = ray_cluster("worker", "--dry-run")
    assert result.returncode == 1
    assert "worker needs the head node's address" in result.stderr


def test_slurm_example_parses_and_uses_our_scripts():
    sbatch = REPO_ROOT / "scripts" / "slurm_grpo.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)], capture_output=True).returncode == 0
    text = sbatch.read_text()
    for used in ("scripts/ray_cluster.sh head --block", "scripts/ray_cluster.sh worker", "scripts/preflight_grpo.py",
                 "bash run.sh 2 2"):
        assert used in text
        path = used.split()[0] if used.startswith("scripts/") else None
        assert path is None or (REPO_ROOT / path).is_file()
