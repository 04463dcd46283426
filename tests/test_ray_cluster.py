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


# ---- the SLURM job's composition, without SLURM: fake scontrol and srun record what would run ----------------

FAKE_SRUN = r"""#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
node = args[args.index("-w") + 1]
with open(os.environ["SRUN_RECORD"], "a") as record:
    record.write(json.dumps({"node": node, "args": args, "env": {k: os.environ.get(k) for k in
                             ("REWARD_SERVER_URL", "nnodes", "RAY_ADDRESS")}}) + "\n")
if "hostname" in args:
    print("10.0.0." + str(ord(node[-1]) - ord("a") + 1) + " 172.17.0.1")
else:
    print(f"output of the job step on {node}")
"""


def sbatch(tmp_path, nodes: str, *args: str, **env: str):
    """Run scripts/slurm_grpo.sbatch as SLURM would on the first node, with scontrol and srun faked:
    (status, stdout+stderr, the srun calls it made)."""
    import json

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && echo \"$3\" | tr ',' '\\n'\n")
    (bin_dir / "srun").write_text(FAKE_SRUN)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    record = tmp_path / "srun.jsonl"
    record.unlink(missing_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": nodes,
                "SLURM_SUBMIT_DIR": str(REPO_ROOT), "SRUN_RECORD": str(record), "exp_dir": str(tmp_path / "exp"),
                "ray_head_wait_s": "0", "grpc_port": "8101", "n_gpus_per_node": "8", **env}
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "slurm_grpo.sbatch"), *args], cwd=tmp_path,
                          env=full_env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return done.returncode, done.stdout + done.stderr, calls


def steps(calls, word):
    return [call for call in calls if word in " ".join(call["args"])]


def test_dedicated_reward_nodes_serve_and_the_rest_train(tmp_path):
    status, out, calls = sbatch(tmp_path, "nodea,nodeb,nodec", "reward_nodes=1", "trainer.total_epochs=2")
    assert status == 0, out
    servers = steps(calls, "run.sh 1 1")
    assert [s["node"] for s in servers] == ["nodec"]  # the last node serves rewards only
    assert "server_host=0.0.0.0" in servers[0]["args"] and "server_log=" in servers[0]["args"]
    assert "server_foreground=true" in servers[0]["args"]
    assert (tmp_path / "exp" / "logs" / "reward_server_nodec.log").read_text() == "output of the job step on nodec\n"
    assert not (tmp_path / "exp" / "logs" / "reward_server_nodea.log").exists()
    # background job steps: their order in the record is not fixed
    ray = sorted(steps(calls, "ray_cluster.sh"), key=lambda r: r["node"])
    assert [(r["node"], r["args"][r["args"].index("scripts/ray_cluster.sh") + 1]) for r in ray] == [
        ("nodea", "head"), ("nodeb", "worker")]
    assert "10.0.0.1" in ray[1]["args"] and "node_ip=10.0.0.1" in ray[0]["args"]  # the head's address from srun
    (preflight,) = steps(calls, "preflight_grpo.py")
    flags = preflight["args"]
    assert preflight["node"] == "nodea"
    assert flags[flags.index("--reward_server_url") + 1] == "grpc://nodec:8101"
    assert flags[flags.index("--nnodes") + 1] == "2"  # training nodes only
    (train,) = steps(calls, "run.sh 2 2")
    assert train["node"] == "nodea" and train["args"][-2:] == ["--", "trainer.total_epochs=2"]
    assert train["env"] == {"REWARD_SERVER_URL": "grpc://nodec:8101", "nnodes": "2", "RAY_ADDRESS": "10.0.0.1:6379"}
    assert "training nodes: nodea nodeb (Ray head nodea); reward server nodes: nodec" in out


def test_without_reward_nodes_every_node_trains_and_serves_with_its_own_log(tmp_path):
    status, out, calls = sbatch(tmp_path, "nodea,nodeb", reward_nodes="0")
    assert status == 0, out
    assert sorted(s["node"] for s in steps(calls, "run.sh 1 1")) == ["nodea", "nodeb"]
    for node in ("nodea", "nodeb"):
        assert (tmp_path / "exp" / "logs" / f"reward_server_{node}.log").read_text() == (
            f"output of the job step on {node}\n")
    (train,) = steps(calls, "run.sh 2 2")
    assert train["env"]["REWARD_SERVER_URL"] == "grpc://nodea:8101,grpc://nodeb:8101"
    assert train["env"]["nnodes"] == "2" and train["args"][-1] == "--"
    (preflight,) = steps(calls, "preflight_grpo.py")
    assert "grpc://nodea:8101,grpc://nodeb:8101" in preflight["args"]


def test_reward_nodes_must_leave_a_training_node(tmp_path):
    status, out, calls = sbatch(tmp_path, "nodea,nodeb", "reward_nodes=2")
    assert status == 2 and calls == []
    assert "reward_nodes=2 leaves no training node: the job has 2 node(s) (nodea nodeb)" in out
    status, out, _ = sbatch(tmp_path, "nodea,nodeb", reward_nodes="two")
    assert status == 2 and "reward_nodes must be a whole number, got 'two'" in out
