"""Speech-token generation with the policy LLM: the zero-shot chat prompt of an utterance,
and two batched backends, transformers (any machine) and vLLM (CUDA machines), sampling
as ``ttsrl.sampling.SamplingOptions`` says. Each backend's ``generate(batch)`` returns the
decoded answer text of every utterance (speech-token pieces, ``ttsrl.speech_tokens``)."""
from __future__ import annotations

from ttsrl.chat_template import prompt_messages
from ttsrl.eval_sets import EvalUtterance
from ttsrl.sampling import SamplingOptions
from ttsrl.speech_tokens import SPEECH_END_TOKENS, format_speech_tokens


def build_messages(utt: EvalUtterance) -> list[dict]:
    """Zero-shot when the prompt's speech tokens are known, else text-only."""
    if utt.prompt_tokens:
        return prompt_messages(utt.prompt_text + utt.text, format_speech_tokens(utt.prompt_tokens))
    return prompt_messages(utt.text)


def chat_prompts(tokenizer, batch: list[EvalUtterance]) -> list[str]:
    """The generation prompts of a batch: each utterance's messages through the model's chat template."""
    return [tokenizer.apply_chat_template(build_messages(u), tokenize=False) for u in batch]


class TransformersGenerator:
    """Batched sampling with transformers; left padding so every prompt ends where generation starts."""

    def __init__(self, model_dir: str, device: str, sampling: SamplingOptions):
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
        self.end_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in SPEECH_END_TOKENS]
        unknown = self.tokenizer.unk_token_id
        if any(i is None or (unknown is not None and i == unknown) for i in self.end_ids):
            raise ValueError(f"{model_dir}: the tokenizer lacks the speech end tokens {SPEECH_END_TOKENS}; "
                             "is this a converted CosyVoice2 checkpoint?")

    def generate(self, batch: list[EvalUtterance]) -> list[str]:
        torch = self.torch
        prompts = chat_prompts(self.tokenizer, batch)
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        s = self.sampling
        kwargs = dict(max_new_tokens=s.max_new_tokens, eos_token_id=self.end_ids,
                      pad_token_id=self.tokenizer.pad_token_id)
        if s.greedy:
            kwargs.update(do_sample=False, top_p=None, top_k=None, temperature=None)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        with torch.no_grad():
            output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=False) for row in new_tokens]


class VllmGenerator:
    """vLLM offline generation (CUDA machines with vllm installed)."""

    def __init__(self, model_dir: str, sampling: SamplingOptions):
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.llm = LLM(model=model_dir, seed=sampling.seed)
        end_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in SPEECH_END_TOKENS]
        if sampling.greedy:
            self.params = SamplingParams(temperature=0.0, max_tokens=sampling.max_new_tokens, stop_token_ids=end_ids)
        else:
            self.params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                         max_tokens=sampling.max_new_tokens, stop_token_ids=end_ids)

    def generate(self, batch: list[EvalUtterance]) -> list[str]:
        prompts = chat_prompts(self.tokenizer, batch)
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=False) for o in outputs]


def make_generator(backend: str, model_dir: str, device: str, sampling: SamplingOptions):
    """The ``--backend`` generator: ``transformers`` on ``device`` or ``vllm`` (its own placement)."""
    if backend == "vllm":
        return VllmGenerator(model_dir, sampling)
    return TransformersGenerator(model_dir, device, sampling)
