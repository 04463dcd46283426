"""CosyVoice2 <-> Hugging Face conversion tests' shared side: a CosyVoice2-style forward to
check against, and the conversion by the real CLI (the fixtures using them: conftest.py).

The reference forward below is written from CosyVoice2's ``Qwen2LM`` design, not
from the converter: the LM input is ``llm_embedding[0]`` (sos), the Qwen2 text
embeddings, ``llm_embedding[1]`` (task id) and ``speech_embedding`` rows of the
prompt speech tokens; the backbone's final (normed) hidden state goes through
``llm_decoder`` (weight and bias). It runs on the raw ``llm.pt`` tensors.

CosyVoice3's reference is the pinned upstream ``CosyVoice3LM`` itself (``cosyvoice3_reference_main``),
run in the server environment, the only one that can import it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, Qwen2Model

from tests.cli import run_script
from ttsrl.chat_template import expected_prompt, prompt_messages
from ttsrl.policy.hf_conversion import BLANK_EN, COSYVOICE2_TEXT_SPECIAL_TOKENS
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
    """The conversion by the real CLI (either family; ``extra``: more flags)."""
    argv = ["--cosyvoice2-dir", str(cosyvoice2_dir), "--output-dir", str(output_dir), *extra]
    assert run_script("convert_cosyvoice2_to_hf", argv) == 0
    return output_dir


def hf_prompt_ids(tokenizer, text: str, speech_ids: list[int], style: str = "cosyvoice2") -> list[int]:
    prompt = tokenizer.apply_chat_template(prompt_messages(text, format_speech_tokens(speech_ids)), tokenize=False)
    assert prompt == expected_prompt(text, style, format_speech_tokens(speech_ids))
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ CosyVoice3: the pinned upstream class

REPO = Path(__file__).resolve().parents[3]
SERVER_PYTHON = REPO / ".venv-server" / "bin" / "python"
"""The pinned CosyVoice source imports torchaudio and onnxruntime, which only the server
environment has; the CosyVoice3 reference runs there, in a subprocess."""
COSYVOICE3_STOP_ROW = 6700
"""A stop row far from eos (6562): CosyVoice3 stops at any of its 200 extra rows."""


def cosyvoice3_reference_main(request_file: str) -> None:
    """Server environment: build the tiny CosyVoice3 LLM from the pinned ``CosyVoice3LM`` and
    compute its logits and greedy decoding, as ``request_file`` (JSON) asks; ``torch.save`` the
    results to its ``output``.

    The model is the pinned class at the tiny Qwen2 size of ``blank_dir`` with the weights of
    ``tiny_llm_pt`` (``write_tiny_cosyvoice3``; loaded strictly, so its key layout is upstream's).
    The stop row ``COSYVOICE3_STOP_ROW`` is pointed at the hidden state after a few greedy steps of
    the first case so greedy decoding stops there. The model's own ``state_dict()`` is saved as
    ``llm_pt``: that is what the conversion under test reads."""
    import json
    import sys
    import tempfile

    request = json.loads(Path(request_file).read_text())
    source = Path(request["cosyvoice_src"])
    for path in (source, source / "third_party" / "Matcha-TTS"):
        sys.path.insert(0, str(path))
    from cosyvoice.llm.llm import CosyVoice3LM, Qwen2Encoder
    from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    blank = Path(request["blank_dir"])
    config = AutoConfig.from_pretrained(str(blank))
    with tempfile.TemporaryDirectory() as qwen_dir:
        Qwen2ForCausalLM(config).save_pretrained(qwen_dir)  # Qwen2Encoder reads a pretrained directory
        encoder = Qwen2Encoder(qwen_dir)
    model = CosyVoice3LM(llm_input_size=config.hidden_size, llm_output_size=config.hidden_size,
                         speech_token_size=6561, llm=encoder, sampling=None)
    model.load_state_dict(torch.load(request["tiny_llm_pt"], weights_only=True), strict=True)
    model.eval()
    frontend = get_qwen_tokenizer(token_path=str(blank), skip_special_tokens=True, version="cosyvoice3")

    def lm_input(text_ids, speech_ids):
        # As CosyVoice3LM.inference assembles it: sos and task id are speech-embedding rows.
        text_emb = model.llm.model.model.embed_tokens(torch.tensor([text_ids]))
        sos = model.speech_embedding.weight[model.sos].reshape(1, 1, -1)
        task = model.speech_embedding.weight[model.task_id].reshape(1, 1, -1)
        speech = model.speech_embedding(torch.tensor([speech_ids], dtype=torch.long))
        return torch.cat([sos, text_emb, task, speech], dim=1)

    def logits(inputs):
        hidden, _ = model.llm(inputs, torch.tensor([inputs.shape[1]]))
        return model.llm_decoder(hidden)[0]

    def greedy(text_ids, speech_ids, steps):
        # The whole prefix each step, stopping at upstream's stop_token_ids. Not
        # inference_wrapper: its KV-cache step passes a one-column attention mask, which
        # transformers 5 (this environment's) reads differently from the 4.51 upstream pins,
        # so its tokens drift from the model's own forward after the first step.
        out = []
        for _ in range(steps):
            token = int(logits(lm_input(text_ids, speech_ids + out))[-1].argmax())
            if token in model.stop_token_ids:
                break
            out.append(token)
        return out

    cases = request["cases"]
    with torch.no_grad():
        first = cases[0]
        first_ids = frontend.encode(first["text"])
        tokens = greedy(first_ids, first["speech"], request["stop_after"])
        inputs = lm_input(first_ids, first["speech"] + tokens)
        hidden = model.llm(inputs, torch.tensor([inputs.shape[1]]))[0][0, -1]
        top = float(model.llm_decoder(hidden).max())
        model.llm_decoder.weight[COSYVOICE3_STOP_ROW] = hidden * ((abs(top) + 20.0) / hidden.dot(hidden))
        results = []
        for case in cases:
            text_ids = frontend.encode(case["text"])
            results.append({"text_ids": text_ids, "logits": logits(lm_input(text_ids, case["speech"])),
                            "greedy": greedy(text_ids, case["speech"], request["max_steps"])})
    torch.save(model.state_dict(), request["llm_pt"])
    torch.save({"cases": results, "stop_token_ids": list(model.stop_token_ids),
                "special": {"sos": model.sos, "eos": model.eos_token, "task_id": model.task_id,
                            "fill": model.fill_token},
                "text_special_tokens": list(frontend.special_tokens["additional_special_tokens"])},
               request["output"])


def run_cosyvoice3_reference(model_dir: Path, work: Path, cases: list[dict], stop_after: int = 4,
                             max_steps: int = 12) -> dict:
    """Run ``cosyvoice3_reference_main`` in the server environment on the tiny CosyVoice3
    directory ``model_dir``, whose llm.pt it replaces by the pinned class's ``state_dict()``;
    returns its results. ``cases``: ``{"text": ..., "speech": [...]}`` each, the text as
    upstream's frontend gets it (``<|endofprompt|>`` included)."""
    import json
    import subprocess

    from ttsrl.cosyvoice_source import find_cosyvoice_source

    if not SERVER_PYTHON.is_file():
        raise FileNotFoundError(f"{SERVER_PYTHON} missing: the CosyVoice3 reference runs in the server "
                                "environment (bash scripts/setup_env.sh server)")
    request = {"cosyvoice_src": str(find_cosyvoice_source()), "blank_dir": str(model_dir / BLANK_EN),
               "tiny_llm_pt": str(model_dir / "llm.pt"), "llm_pt": str(model_dir / "llm.pt"),
               "output": str(work / "reference.pt"),
               "cases": cases, "stop_after": stop_after, "max_steps": max_steps}
    request_file = work / "reference_request.json"
    request_file.write_text(json.dumps(request, ensure_ascii=False))
    code = ("import sys; from tests.ttsrl.policy.conversion_utils import cosyvoice3_reference_main; "
            "cosyvoice3_reference_main(sys.argv[1])")
    done = subprocess.run([str(SERVER_PYTHON), "-c", code, str(request_file)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"CosyVoice3 reference failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return torch.load(work / "reference.pt", weights_only=True)
