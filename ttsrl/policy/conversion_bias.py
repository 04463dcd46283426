"""What the Hugging Face form of CosyVoice2's LLM changes: the dropped ``llm_decoder.bias``
and the probability that leaks to non-speech tokens (``ttsrl.policy.hf_conversion`` explains
why neither can be carried over). torch only, plus the model and tokenizer given (trainer
environment); ``convert_cosyvoice2_to_hf.py --measure`` and benchmarks/bench_conversion_bias.py
report these numbers.
"""
from __future__ import annotations

import torch

from ttsrl.policy.hf_conversion import SPEECH_ROWS, TOP_K, llm_bias_bound, speech_token_offset
from ttsrl.speech_tokens import SPEECH_VOCAB_SIZE


def bias_effect(full_logits: torch.Tensor, offset: int, bias: torch.Tensor) -> dict[str, float]:
    """Compare CosyVoice2's next-token distribution with the converted model's.

    ``full_logits`` (positions x vocab): the converted model's logits. Its
    speech-row logits equal CosyVoice2's ``llm_decoder`` output minus the bias,
    so CosyVoice2's distribution is ``softmax(speech_logits + bias)``. Reported
    (over positions; KL in nats):

    * ``kl_bias_*``: KL(CosyVoice2 || converted restricted to speech tokens),
      the effect of dropping the bias alone (this is what CosyVoice2 itself
      would compute from the exported ``llm.pt``);
    * ``kl_total_*``: KL(CosyVoice2 || converted over the full vocabulary),
      adding the mass that leaks to non-speech tokens;
    * ``max_abs_logprob_diff``: largest |change| of a speech log-probability from the bias;
    * ``nonspeech_mass_*``: probability the converted model gives to non-speech tokens;
    * ``top1_agreement``: share of positions where both pick the same argmax.
    """
    full_logits = full_logits.float().reshape(-1, full_logits.shape[-1])
    bias = bias.float()
    speech = full_logits[:, offset:offset + SPEECH_ROWS]
    logp_orig = torch.log_softmax(speech + bias, dim=-1)
    logp_speech = torch.log_softmax(speech, dim=-1)
    logp_full = torch.log_softmax(full_logits, dim=-1)
    p_orig = logp_orig.exp()
    kl_bias = (p_orig * (logp_orig - logp_speech)).sum(-1)
    kl_total = (p_orig * (logp_orig - logp_full[:, offset:offset + SPEECH_ROWS])).sum(-1)
    nonspeech = 1.0 - logp_full[:, offset:offset + SPEECH_ROWS].exp().sum(-1)
    top1 = (logp_orig.argmax(-1) == (full_logits.argmax(-1) - offset)).float()
    return {
        "positions": int(full_logits.shape[0]),
        "kl_bias_mean": float(kl_bias.mean()), "kl_bias_max": float(kl_bias.max()),
        "kl_total_mean": float(kl_total.mean()), "kl_total_max": float(kl_total.max()),
        "max_abs_logprob_diff": float((logp_orig - logp_speech).abs().max()),
        "nonspeech_mass_mean": float(nonspeech.clamp_min(0).mean()),
        "nonspeech_mass_max": float(nonspeech.clamp_min(0).max()),
        "top1_agreement": float(top1.mean()),
        "bias_bound": llm_bias_bound(bias),
    }


MEASURE_TEXTS = ("今天天气很好，我们一起去公园散步吧。", "扁担长，板凳宽，扁担绑在板凳上。", "请在二零二四年三月五日之前提交报告。")


@torch.inference_mode()
def measure_conversion(model, tokenizer, bias: torch.Tensor, texts=MEASURE_TEXTS, steps: int = 50,
                       seed: int = 0) -> dict[str, float]:
    """``bias_effect`` along trajectories that CosyVoice2 itself would sample.

    For each text: prompt ``<|sos|>text<|task_id|>``; at each step take the
    converted model's logits, compare (``bias_effect``), and feed the next
    speech token drawn from CosyVoice2's biased distribution (top-k 25), so
    the positions measured are ones the original model visits.
    """
    offset = speech_token_offset(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for text in texts:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        past = None
        for _ in range(steps):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1:].float()
            rows.append(logits)
            scores = logits[0, offset:offset + SPEECH_ROWS] + bias.float()
            top = torch.topk(scores, TOP_K)
            choice = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)]
            token = int(choice)
            if token >= SPEECH_VOCAB_SIZE:
                break
            ids = torch.tensor([[offset + token]])
    return bias_effect(torch.cat(rows), offset, bias)


def measure_converted(converted, llm_pt, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, float]:
    """``measure_conversion`` of an in-memory conversion (``hf_conversion.Converted``) as a
    ``dtype`` model, against the ``llm_decoder.bias`` of the ``llm.pt`` it was made from."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(converted.config).to(dtype)
    model.load_state_dict(converted.state, strict=True)
    model.eval()
    bias = torch.load(llm_pt, map_location="cpu", weights_only=True)["llm_decoder.bias"]
    return measure_conversion(model, converted.tokenizer, bias, seed=seed)
