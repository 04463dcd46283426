"""Prompt templates for the speech-token policy, in one place.

Data rows carry the veRL chat form ``[{"role": "user", "content": text},
{"role": "assistant", "content": ""}]``; the tokenizer's chat template renders it as one
string. The ids the policy reads are not that rendering: ``ttsrl.frontend`` builds them as
upstream CosyVoice does (prompt text and text tokenized apart), and every stage that prompts
the policy uses it. The templates stay for the converted tokenizer and for reading rows.

``cosyvoice2`` (default): ``<|sos|>`` + text + ``<|task_id|>``, exactly what
CosyVoice2's own LLM is fed (sos embedding, text embeddings, task-id
embedding) once its two ``llm_embedding`` rows are mapped to these tokens.
Assistant content (prompt speech tokens for zero-shot use) follows verbatim.

``cosyvoice3``: the same layout for CosyVoice3's LLM, whose ``<|sos|>`` and ``<|task_id|>``
are speech rows; its text must hold ``<|endofprompt|>`` (upstream asserts it), so a user turn
without one gets ``COSYVOICE3_SYSTEM_PREFIX`` in front, as upstream's CosyVoice3 serving does.
Data rows are the same for both families; the family's tokenizer carries its template.

``legacy``: the ChatML form of the earlier Qwen-based speech-token checkpoints
of seed 000, whose assistant turn opens with ``<|SPEECH_GENERATION_START|>``.
"""
from __future__ import annotations

from .model_family import COSYVOICE3_SYSTEM_PREFIX, ENDOFPROMPT_TOKEN, ModelFamily, get_family
from .speech_tokens import SOS_TOKEN, TASK_ID_TOKEN, format_speech_tokens

SPEECH_GENERATION_START = "<|SPEECH_GENERATION_START|>"

COSYVOICE2_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '" + SOS_TOKEN + "' + message['content'] + '" + TASK_ID_TOKEN + "' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] }}"
    "{%- endif %}"
    "{%- endfor %}"
)

COSYVOICE3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if '" + ENDOFPROMPT_TOKEN + "' in message['content'] %}"
    "{{- '" + SOS_TOKEN + "' + message['content'] + '" + TASK_ID_TOKEN + "' }}"
    "{%- else %}"
    "{{- '" + SOS_TOKEN + COSYVOICE3_SYSTEM_PREFIX + "' + message['content'] + '" + TASK_ID_TOKEN + "' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] }}"
    "{%- endif %}"
    "{%- endfor %}"
)

LEGACY_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n" + SPEECH_GENERATION_START + "' + message['content'] }}"
    "{%- endif %}"
    "{%- endfor %}"
)

TEMPLATES = {"cosyvoice2": COSYVOICE2_TEMPLATE, "cosyvoice3": COSYVOICE3_TEMPLATE, "legacy": LEGACY_TEMPLATE}


def family_template(family: str | ModelFamily | None = None) -> str:
    """The chat template a converted tokenizer of ``family`` (default CosyVoice2) carries."""
    return TEMPLATES[get_family(family).chat_template_style]


def prompt_messages(text: str, prompt_speech: str = "") -> list[dict]:
    """The veRL chat form of one utterance (``prompt_speech``: ``<|s_N|>`` text)."""
    return [{"role": "user", "content": text}, {"role": "assistant", "content": prompt_speech}]


def zero_shot_messages(text: str, prompt_text: str = "", prompt_tokens=()) -> list[dict]:
    """The policy's input for ``text`` in the voice of a speaker prompt: CosyVoice2's zero-shot
    LLM input (prompt transcript + text between ``<|sos|>`` and ``<|task_id|>``, then the
    prompt's speech tokens, after which the LLM continues in that voice). Without prompt
    tokens it is the text-only input (the layout only: the policy's ids come from ttsrl.frontend)."""
    if len(prompt_tokens):
        return prompt_messages(prompt_text + text, format_speech_tokens(prompt_tokens))
    return prompt_messages(text)


def expected_prompt(text: str, style: str = "cosyvoice2", prompt_speech: str = "") -> str:
    """The string a tokenizer carrying ``TEMPLATES[style]`` must render for ``text``.

    Written out by hand (not via jinja) so tests can check a tokenizer against it.
    """
    if style == "cosyvoice2":
        return SOS_TOKEN + text + TASK_ID_TOKEN + prompt_speech
    if style == "cosyvoice3":
        prefix = "" if ENDOFPROMPT_TOKEN in text else COSYVOICE3_SYSTEM_PREFIX
        return SOS_TOKEN + prefix + text + TASK_ID_TOKEN + prompt_speech
    if style == "legacy":
        return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n{SPEECH_GENERATION_START}{prompt_speech}"
    raise ValueError(f"unknown chat template style {style!r}; expected one of {sorted(TEMPLATES)}")
