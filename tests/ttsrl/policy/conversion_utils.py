"""CosyVoice2 <-> Hugging Face conversion tests' shared side: a CosyVoice2-style forward to
check against, and the conversion by the real CLI (the fixtures using them: conftest.py).

The reference forward below is written from CosyVoice2's ``Qwen2LM`` design, not
from the converter: the LM input is ``llm_embedding[0]`` (sos), the Qwen2 text
embeddings, ``llm_embedding[1]`` (task id) and ``speech_embedding`` rows of the
prompt speech tokens; the backbone's final (normed) hidden state goes through
``llm_decoder`` (weight and bias). It runs on the raw ``llm.pt`` tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, Qwen2Model

from tests.cli import run_script
from ttsrl.chat_template import expected_prompt, prompt_messages
from ttsrl.policy.hf_conversion import COSYVOICE2_TEXT_SPECIAL_TOKENS
from ttsrl.speech_tokens import SPEECH_VOCAB_SIZE, format_speech_tokens

TEXT = "今天天气很好[breath]，我们去公园吧。"
PROMPT_SPEECH = [12, 6000, 3, 4095, 6560]
EOS = SPEECH_VOCAB_SIZE  # CosyVoice2's stop token (row 6561)


# ------------------------------------------------------------------ reference side

class CosyVoice2Reference:
    """CosyVoice2's LLM forward on the tensors of an ``llm.pt``."""

    def __init__(self, llm_state: dict, blank_dir: Path):
        config = AutoConfig.from_pretrained(str(blank_dir))
        self.backbone = Qwen2Model(config)
        prefix = "llm.model.model."
        self.backbone.load_state_dict({k[len(prefix):]: v for k, v in llm_state.items() if k.startswith(prefix)},
                                      strict=True)
        self.backbone.eval()
        self.state = llm_state
        # CosyVoice2's frontend tokenizer: the Qwen2 tokenizer plus its special text tokens.
        self.tokenizer = AutoTokenizer.from_pretrained(str(blank_dir))
        self.tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                           "additional_special_tokens": list(COSYVOICE2_TEXT_SPECIAL_TOKENS)})

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def lm_input(self, text_ids, speech_ids):
        s = self.state
        parts = [s["llm_embedding.weight"][0:1], s["llm.model.model.embed_tokens.weight"][torch.tensor(text_ids)],
                 s["llm_embedding.weight"][1:2]]
        if speech_ids:
            parts.append(s["speech_embedding.weight"][torch.tensor(speech_ids)])
        return torch.cat(parts).unsqueeze(0)

    @torch.no_grad()
    def logits(self, text_ids, speech_ids) -> torch.Tensor:
        """(positions, 6564) logits of ``llm_decoder`` at every input position."""
        hidden = self.backbone(inputs_embeds=self.lm_input(text_ids, speech_ids)).last_hidden_state[0]
        return hidden @ self.state["llm_decoder.weight"].T + self.state["llm_decoder.bias"]

    def greedy(self, text_ids, prompt_speech, max_steps: int) -> tuple[list[int], bool]:
        """Greedy decoding over the 6564 outputs; stops at any end token (6561..6563)."""
        out: list[int] = []
        for _ in range(max_steps):
            token = int(self.logits(text_ids, prompt_speech + out)[-1].argmax())
            if token >= SPEECH_VOCAB_SIZE:
                return out, True
            out.append(token)
        return out, False


def convert(cosyvoice2_dir: Path, output_dir: Path, *extra: str) -> Path:
    argv = ["--cosyvoice2-dir", str(cosyvoice2_dir), "--output-dir", str(output_dir), *extra]
    assert run_script("convert_cosyvoice2_to_hf", argv) == 0
    return output_dir


def hf_prompt_ids(tokenizer, text: str, speech_ids: list[int]) -> list[int]:
    prompt = tokenizer.apply_chat_template(prompt_messages(text, format_speech_tokens(speech_ids)), tokenize=False)
    assert prompt == expected_prompt(text, "cosyvoice2", format_speech_tokens(speech_ids))
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]
