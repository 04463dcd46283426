"""Speech-token generation with the policy LLM: upstream CosyVoice's LLM input of an utterance
(``ttsrl.frontend``: the text normalized and split as upstream does, prompt text and text
tokenized apart, the prompt's speech tokens trimmed as upstream trims them), and two batched
backends, transformers (any machine) and vLLM (CUDA machines), sampling as
``ttsrl.sampling.SamplingOptions`` says, each LLM call between upstream's min and max speech
tokens (``min_token_text_ratio``/``max_token_text_ratio`` times its text tokens, and at most
``max_new_tokens``). Each backend's ``generate(batch)`` returns the decoded answer text of every
utterance (speech-token pieces, ``ttsrl.speech_tokens``); a text upstream synthesizes in
several LLM calls gets the calls' speech tokens one after another. Both stop at the stop tokens
of the model's family (``ttsrl.model_family``), which a converted directory records;
``generator.family`` is it (parse the answers with ``parse_speech_tokens(text, generator.family)``)."""
from __future__ import annotations

import os

from ttsrl.eval_sets import EvalUtterance
from ttsrl.frontend import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO, PolicyFrontend, row_policy_input
from ttsrl.sampling import SamplingOptions
from ttsrl.model_family import ModelFamily, family_of_hf_dir, get_family
from ttsrl.speech_tokens import format_speech_tokens, parse_speech_tokens


def utterance_inputs(frontend: PolicyFrontend, utt: EvalUtterance) -> list:
    """The LLM calls of ``utt``: a stage-0 row's own input, else upstream's frontend on its text,
    zero-shot when the prompt's speech tokens are known (trimmed to the prompt wav when there is
    one), else text-only."""
    if utt.row is not None:
        return [row_policy_input(frontend, utt.row.get("extra_info"), utt.row.get("messages"))]
    tokens = list(utt.prompt_tokens or [])
    if tokens and utt.prompt_wav:
        from ttsrl.frontend import wav_prompt_token_limit

        tokens = tokens[:wav_prompt_token_limit(utt.prompt_wav)]
    return frontend.inputs(utt.text, utt.prompt_text, tokens)


def join_answers(answers: list[str], family) -> str:
    """The answers of one utterance's LLM calls as one answer: each call's speech tokens in turn,
    then the end token when the last call ended (a single call's answer is kept as it is)."""
    if len(answers) == 1:
        return answers[0]
    parsed = [parse_speech_tokens(a, family) for a in answers]
    ids = [i for p in parsed for i in p.ids]
    return format_speech_tokens(ids) + (get_family(family).eos_token if parsed[-1].ended else "")


class FrontendBatching:
    """What both backends share: a batch of utterances -> the flat list of LLM calls -> one answer
    per utterance."""

    frontend: PolicyFrontend
    family: ModelFamily

    def generate(self, batch: list[EvalUtterance]) -> list:
        """One answer per utterance; an utterance upstream's frontend refuses (its text normalizes
        to nothing) gets its ``FrontendError`` instead, the others are generated."""
        from ttsrl.frontend import FrontendError

        calls = []
        for utt in batch:
            try:
                calls.append(utterance_inputs(self.frontend, utt))
            except FrontendError as error:
                calls.append(error)
        answers = self.generate_inputs([c for per in calls if isinstance(per, list) for c in per])
        joined, start = [], 0
        for per in calls:
            if not isinstance(per, list):
                joined.append(per)
                continue
            joined.append(join_answers(answers[start:start + len(per)], self.family))
            start += len(per)
        return joined


def stop_token_ids(tokenizer, model_dir: str, family: str | ModelFamily | None = None) -> list[int]:
    """Ids of the stop tokens of ``family`` (None: the one ``model_dir`` records) in ``tokenizer``;
    a clear error when the tokenizer lacks any of them."""
    family = family_of_hf_dir(model_dir) if family is None else get_family(family)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens]
    unknown = tokenizer.unk_token_id
    missing = [t for t, i in zip(family.stop_tokens, ids) if i is None or (unknown is not None and i == unknown)]
    if missing:
        raise ValueError(f"{model_dir}: the tokenizer lacks the {family.name} speech end tokens {missing[:5]}; "
                         f"is this a converted {family.name} checkpoint?")
    return ids


def make_frontend(tokenizer, family, sampling: SamplingOptions) -> PolicyFrontend:
    return PolicyFrontend(tokenizer, family, min_ratio=sampling.min_token_text_ratio,
                          max_ratio=sampling.max_token_text_ratio)


class RowLengthBounds:
    """A transformers logits processor: row r may not stop before its ``minimum[r]`` new tokens
    (its stop tokens are masked), as upstream's decoding ignores eos below ``min_len``."""

    def __init__(self, prompt_length: int, minimum: list[int], stop_ids: list[int]):
        self.prompt_length, self.minimum, self.stop_ids = prompt_length, minimum, stop_ids

    def __call__(self, input_ids, scores):
        generated = input_ids.shape[1] - self.prompt_length
        for row, minimum in enumerate(self.minimum):
            if generated < minimum:
                scores[row, self.stop_ids] = -float("inf")
        return scores


class TransformersGenerator(FrontendBatching):
    """Batched sampling with transformers; left padding so every prompt ends where generation starts."""

    def __init__(self, model_dir: str, device: str, sampling: SamplingOptions,
                 family: str | ModelFamily | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device
        self.sampling = sampling
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.family = family_of_hf_dir(model_dir) if family is None else get_family(family)
        self.end_ids = stop_token_ids(self.tokenizer, model_dir, self.family)
        self.frontend = make_frontend(self.tokenizer, self.family, sampling)

    def generate_inputs(self, calls: list) -> list[str]:
        """One answer per ``PolicyInput``: its ids, at least its min and at most its max new tokens."""
        from transformers import LogitsProcessorList

        torch = self.torch
        s = self.sampling
        padded = self.tokenizer.pad({"input_ids": [list(c.ids) for c in calls]}, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in padded.items()}
        maximum = [c.max_new_tokens(s.max_new_tokens) for c in calls]
        minimum = [c.min_new_tokens(s.max_new_tokens) for c in calls]
        prompt_length = inputs["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=max(maximum), eos_token_id=self.end_ids, pad_token_id=self.tokenizer.pad_token_id,
                      logits_processor=LogitsProcessorList([RowLengthBounds(prompt_length, minimum, self.end_ids)]))
        if s.greedy:
            kwargs.update(do_sample=False, top_p=None, top_k=None, temperature=None)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        with torch.no_grad():
            output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, prompt_length:]
        # a row's tokens do not depend on the rows that go on longer: cut each at its own maximum
        return [self.tokenizer.decode(row[:limit], skip_special_tokens=False) for row, limit in zip(new_tokens, maximum)]


OWN_GPU_MEMORY_SHARE = 0.85
"""vLLM's ``gpu_memory_utilization`` on a GPU the rank has to itself: the engine preallocates
this share for weights and KV cache and leaves the rest for the rank's own CUDA context (the
torch process group, the NCCL buffers)."""

SHARED_GPU_MEMORY_SHARE = 0.5
"""... and on a GPU the reward server also uses (``--server-devices``; the recipe's default serves
on every training GPU, and stage 4's evaluation server on the same ones): token2wav, the ASR and
the speaker model take a few GiB per server slot
there, and vLLM refuses to start when less than its share is free. A 0.5B policy needs about
1 GiB of weights, so half of a data-centre GPU is still a large KV cache."""


class PlacementError(ValueError):
    """The ranks of a job cannot each have a GPU of their own; the message says how to fix it."""


def parse_server_devices(text: str) -> frozenset[int]:
    """``--server-devices`` (the reward server's ``--devices``: comma-separated GPU indices of the
    visible devices, or ``cpu``; ``none`` when no server runs on this node) -> its GPU indices."""
    devices = set()
    for piece in (p.strip() for p in str(text).split(",")):
        if not piece or piece in ("cpu", "none"):
            continue
        if piece.startswith("cuda:"):
            piece = piece[len("cuda:"):]
        if not piece.isdigit():
            raise PlacementError(f"--server-devices {text!r}: {piece!r} is neither 'cpu', 'none' nor a GPU index")
        devices.add(int(piece))
    return frozenset(devices)


def visible_gpus(environ=None, device_count=None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices, UUIDs or MIG
    ids); when it is unset, every GPU torch counts (``device_count``, default torch's)."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    return [str(i) for i in range(device_count)]


def vllm_placement(rank: int, local_rank: int, visible: list[str], server_devices=frozenset(),
                   local_world_size: int | None = None, own_share: float = OWN_GPU_MEMORY_SHARE,
                   shared_share: float = SHARED_GPU_MEMORY_SHARE) -> tuple[str, float]:
    """Where the vLLM engine of one torchrun rank runs: (the GPU, as CUDA_VISIBLE_DEVICES names it,
    vLLM's ``gpu_memory_utilization``).

    Rank ``local_rank`` of a node takes the ``local_rank``-th visible GPU (torchrun's convention,
    which infer_dist's process group follows too), so N ranks use N different GPUs. The share is
    ``shared_share`` when that GPU index is one of the reward server's ``server_devices`` (the
    same indices of the same visible set), else ``own_share``. More ranks on a node
    (``local_world_size``) than visible GPUs is refused on every rank, so the whole job stops."""
    local_world_size = local_rank + 1 if local_world_size is None else local_world_size
    for name, share in (("--gpu-memory-utilization", own_share), ("--shared-gpu-memory-utilization", shared_share)):
        if not 0.0 < share <= 1.0:
            raise PlacementError(f"{name} {share}: must be in (0, 1]")
    if not visible:
        raise PlacementError("--backend vllm needs a GPU, but none is visible (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use --backend transformers on CPU")
    if local_world_size > len(visible) or local_rank >= len(visible):
        raise PlacementError(
            f"rank {rank} (local rank {local_rank} of {local_world_size} on this node): --backend vllm puts each "
            f"rank on a GPU of its own, but only {len(visible)} GPU(s) are visible ({','.join(visible)}); run "
            f"torchrun --nproc_per_node={len(visible)} or fewer (eval_nproc), or make more GPUs visible")
    share = shared_share if local_rank in server_devices else own_share
    return visible[local_rank], share


def vllm_engine_kwargs(model_dir: str, sampling: SamplingOptions, rank: int, memory_share: float) -> dict:
    """The ``vllm.LLM(...)`` arguments of one rank: rank r samples with seed + r (as the
    transformers backend does), within its memory share of the GPU it was placed on."""
    return {"model": model_dir, "seed": sampling.seed + rank, "gpu_memory_utilization": memory_share}


def rank_placement(environ=None, server_devices: str = "0", own_share: float = OWN_GPU_MEMORY_SHARE,
                   shared_share: float = SHARED_GPU_MEMORY_SHARE) -> tuple[int, str, float]:
    """(rank, GPU, memory share) of this torchrun rank (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and
    the visible GPUs of ``environ``, default this process's), by ``vllm_placement``."""
    environ = os.environ if environ is None else environ
    if environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
        # In-process, the engine would use this process's first GPU and its torch process group.
        raise PlacementError("VLLM_ENABLE_V1_MULTIPROCESSING=0: infer_dist.py needs vLLM's engine in a process of "
                             "its own (pinned to the rank's GPU); unset it")
    rank = int(environ.get("RANK", "0"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    local_world_size = int(environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    gpu, share = vllm_placement(rank, local_rank, visible_gpus(environ), parse_server_devices(server_devices),
                                local_world_size, own_share, shared_share)
    return rank, gpu, share


def place_vllm_engine(environ=None, **placement) -> tuple[int, float]:
    """Pin this rank's coming vLLM engine to its GPU (``rank_placement``): CUDA_VISIBLE_DEVICES
    becomes that one GPU, which the engine process vLLM spawns inherits (vLLM 0.24 has no
    device-index option; its engine takes the first visible GPU). This process's own CUDA state
    (set up before, on cuda:LOCAL_RANK) is not affected. Returns (rank, memory share)."""
    environ = os.environ if environ is None else environ
    rank, gpu, share = rank_placement(environ, **placement)
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    return rank, share


class VllmGenerator(FrontendBatching):
    """vLLM offline generation (CUDA machines with vllm installed), one engine per rank on the
    rank's own GPU (``place_vllm_engine``)."""

    def __init__(self, model_dir: str, sampling: SamplingOptions, server_devices: str = "0",
                 own_share: float = OWN_GPU_MEMORY_SHARE, shared_share: float = SHARED_GPU_MEMORY_SHARE):
        from transformers import AutoTokenizer

        rank, share = place_vllm_engine(server_devices=server_devices, own_share=own_share, shared_share=shared_share)
        from vllm import LLM, SamplingParams  # after the placement: importing vllm may look at the GPUs

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.llm = LLM(**vllm_engine_kwargs(model_dir, sampling, rank, share))
        self.family = family_of_hf_dir(model_dir)
        self.sampling = sampling
        self.frontend = make_frontend(self.tokenizer, self.family, sampling)
        end_ids = stop_token_ids(self.tokenizer, model_dir, self.family)
        if sampling.greedy:
            self.params = dict(temperature=0.0, stop_token_ids=end_ids)
        else:
            self.params = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                               stop_token_ids=end_ids)
        self._params_type = SamplingParams

    def generate_inputs(self, calls: list) -> list[str]:
        """One answer per ``PolicyInput``, with its own min/max tokens (vLLM's per-request limits)."""
        cap = self.sampling.max_new_tokens
        params = [self._params_type(**self.params, min_tokens=c.min_new_tokens(cap), max_tokens=c.max_new_tokens(cap))
                  for c in calls]
        prompts = [{"prompt_token_ids": list(c.ids)} for c in calls]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=False) for o in outputs]


def make_generator(backend: str, model_dir: str, device: str, sampling: SamplingOptions, **vllm_options):
    """The ``--backend`` generator: ``transformers`` on ``device`` or ``vllm`` (one GPU per rank;
    ``vllm_options``: ``VllmGenerator``'s server_devices, own_share, shared_share)."""
    if backend == "vllm":
        return VllmGenerator(model_dir, sampling, **vllm_options)
    return TransformersGenerator(model_dir, device, sampling)
