"""Upstream CosyVoice's LLM input, built here exactly as the pinned source builds it: the one
home of what the policy reads (stage 0, the rollouts, the reward's length guard, DPO sampling,
the warm-up, evaluation and synthesis all build it here).

A checkpoint trained by this recipe is deployed with upstream's ``CosyVoice2`` /
``CosyVoice3.inference_zero_shot(text, prompt_text, prompt_wav)`` (pinned source ace7c47:
``cosyvoice/cli/cosyvoice.py``, ``cosyvoice/cli/frontend.py``, ``cosyvoice/llm/llm.py``).
What that call feeds the LLM, and so what the policy trains on:

1. **Text normalization** (``TextNormalizer``; upstream's ``CosyVoiceFrontEnd.text_normalize``).
   The normalizer is picked as upstream picks it: ttsfrd when it imports and initializes with
   its resource folder (``$cosyvoice_src/pretrained_models/CosyVoice-ttsfrd/resource``), else
   wetext (``Normalizer(remove_erhua=False)`` for text with a Chinese character,
   ``Normalizer()`` otherwise). Its rules are the library's; around it come upstream's few
   string steps in upstream's order: for Chinese, newlines removed, blanks between non-ASCII
   characters removed, ``²``/``³`` spelled, ``.`` -> ``。``, ``" - "`` -> ``，``, brackets
   removed, trailing commas -> ``。``; otherwise digits spelled out with inflect. A text holding
   ``<|`` and ``|>`` (a special token) is not normalized at all. The text is then split into
   segments of 60-80 characters (Chinese) or tokens (other) at sentence punctuation, each
   ending in sentence punctuation (``。`` or ``.`` is added when missing), and segments of
   punctuation only are dropped: upstream synthesizes each segment with its own LLM call.
   The prompt text is normalized the same way but never split (and gets no final ``。``).
2. **Tokenization at the join**: the prompt text and each segment are tokenized separately
   (upstream's ``_extract_text_token``) and their ids concatenated, so no BPE merge crosses
   the join.
3. **The LLM input** (``Qwen2LM.inference`` / ``CosyVoice3LM.inference``): sos, prompt text
   ids, segment ids, task id, then the prompt's speech tokens, after which the LLM continues.
   In the Hugging Face form of the policy (``ttsrl.policy.hf_conversion``) sos and task id are
   the tokens ``<|sos|>`` and ``<|task_id|>`` and speech token N is ``<|s_N|>``.
   CosyVoice3's text must hold ``<|endofprompt|>`` (upstream asserts it): its prompt text is
   ``COSYVOICE3_SYSTEM_PREFIX`` + the transcript, as upstream's example and its serving
   call it, which (holding a special token) upstream does not normalize. A CosyVoice3 row with
   no speaker prompt reads the prefix alone as its prompt text (upstream's
   ``inference_instruct2`` with the bare system prompt): its text is normalized as always.
4. **Prompt-token trimming** (``trim_prompt_tokens``): for 24 kHz models (both families)
   upstream keeps ``min(mel_frames // 2, tokens)`` of the prompt's speech tokens, for the LLM
   as for the flow; ``mel_frames`` is the prompt wav's length at 24 kHz over the 480-sample hop.
5. **Length bounds**: upstream decodes at least ``min_token_text_ratio`` (2) and at most
   ``max_token_text_ratio`` (20) times the segment's text tokens (``text_len -
   prompt_text_len``). ``PolicyInput.min_tokens`` / ``max_tokens`` carry them to the rollouts
   (veRL's per-request sampling limits), evaluation and synthesis.

``tests/server/test_frontend_peer.py`` checks all of this against the pinned upstream code
(its frontend and both LLM classes) on a real Qwen BPE vocabulary.

Standard library at import time (both environments import it); wetext, inflect, regex and
soundfile are imported when first needed.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from ttsrl.model_family import COSYVOICE3_SYSTEM_PREFIX, ENDOFPROMPT_TOKEN, ModelFamily, get_family

LOGGER = logging.getLogger(__name__)

MIN_TOKEN_TEXT_RATIO = 2.0
"""Upstream's ``min_token_text_ratio``: at least this many speech tokens per text token."""
MAX_TOKEN_TEXT_RATIO = 20.0
"""Upstream's ``max_token_text_ratio``: at most this many speech tokens per text token."""
SHORT_TEXT_RATIO = 0.5
"""Upstream warns ("may lead to bad performance") when a segment has fewer characters than
this share of the prompt text's."""
SPLIT_MAX, SPLIT_MIN, SPLIT_MERGE = 80, 60, 20
"""``split_paragraph``'s token_max_n, token_min_n and merge_len as ``text_normalize`` calls it."""
FLOW_SAMPLE_RATE = 24000
"""The sample rate of both families' flow (and of upstream's prompt mel features)."""
MEL_HOP = 480
"""The hop of upstream's 24 kHz mel features (``feat_extractor``: n_fft 1920, hop 480, no centering)."""
TTSFRD_RESOURCE = Path("pretrained_models") / "CosyVoice-ttsfrd" / "resource"
"""Where upstream looks for ttsfrd's resources, under its source checkout."""

_CHINESE = re.compile(r"[\u4e00-\u9fff]+")
_ZH_PUNCTUATION = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
_EN_PUNCTUATION = (".", "?", "!", ";", ":")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")


class FrontendError(ValueError):
    """A text upstream's frontend cannot turn into an LLM input (it normalizes to nothing, or
    upstream's own code fails on it); the message names the text."""


class NeedsTokenizerError(FrontendError):
    """Splitting this (non-Chinese) text needs the policy's tokenizer: it may be over upstream's
    80-token segment length, which only the tokenizer can tell."""


# ------------------------------------------------------------------ upstream's string steps

def contains_chinese(text: str) -> bool:
    """Whether ``text`` has a CJK unified ideograph (upstream's test for the Chinese path)."""
    return bool(_CHINESE.search(text))


def replace_blank(text: str) -> str:
    """Blanks kept only between two ASCII non-blank characters (upstream's rule, including its
    look at the last character for a blank in first position)."""
    out = []
    for i, char in enumerate(text):
        if char != " ":
            out.append(char)
            continue
        after, before = text[i + 1], text[i - 1]  # IndexError for a trailing blank, as upstream
        if after.isascii() and after != " " and before.isascii() and before != " ":
            out.append(char)
    return "".join(out)


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    for mark in ("（", "）", "【", "】", "`"):
        text = text.replace(mark, "")
    return text.replace("——", " ")


def is_only_punctuation(text: str) -> bool:
    """Empty, or punctuation and symbols only (Unicode categories P and S)."""
    import regex

    return bool(regex.fullmatch(r"^[\p{P}\p{S}]*$", text))


@functools.lru_cache(maxsize=1)
def _inflect_engine():
    import inflect

    return inflect.engine()


def spell_out_number(text: str) -> str:
    """Each run of digits (``str.isdigit``) replaced by inflect's words for it."""
    out = []
    start = None
    for i, char in enumerate(text):
        if char.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(_inflect_engine().number_to_words(text[start:i]))
            start = None
        out.append(char)
    if start is not None:
        out.append(_inflect_engine().number_to_words(text[start:]))
    return "".join(out)


def split_paragraph(text: str, length: Callable[[str], int], chinese: bool) -> list[str]:
    """Upstream's segmentation: sentences ended by punctuation (a closing quote stays with its
    sentence; a punctuation mark right after another is dropped), grouped into segments of at
    most SPLIT_MAX units unless the segment so far has no more than SPLIT_MIN, a last segment
    under SPLIT_MERGE units joining the one before. Units: characters for Chinese, else
    ``length`` (tokens)."""
    punctuation = _ZH_PUNCTUATION if chinese else _EN_PUNCTUATION
    measure = len if chinese else length
    if text[-1] not in punctuation:
        text += "。" if chinese else "."
    sentences = []
    start = 0
    for i, char in enumerate(text):
        if char not in punctuation:
            continue
        if text[start:i]:
            sentences.append(text[start:i] + char)
        if i + 1 < len(text) and text[i + 1] in ('"', "”"):
            sentences.append(sentences.pop(-1) + text[i + 1])  # IndexError as upstream: '."' at the start
            start = i + 2
        else:
            start = i + 1
    segments = []
    current = ""
    for sentence in sentences:
        if measure(current + sentence) > SPLIT_MAX and measure(current) > SPLIT_MIN:
            segments.append(current)
            current = ""
        current += sentence
    if current:
        if measure(current) < SPLIT_MERGE and segments:
            segments[-1] += current
        else:
            segments.append(current)
    return segments


def _utf8_length_bound(text: str) -> int:
    """An upper bound of the byte-level BPE token count of ``text`` (each token is >= 1 byte)."""
    return len(text.encode("utf-8"))


# ------------------------------------------------------------------ the normalizer

def ttsfrd_resource_dir(cosyvoice_src: str | os.PathLike | None = None) -> Path:
    """ttsfrd's resource folder under the CosyVoice checkout (``$cosyvoice_src``, default
    ``CosyVoice`` as configs/default.sh says), where upstream's frontend looks for it."""
    source = cosyvoice_src or os.environ.get("cosyvoice_src") or "CosyVoice"
    return Path(source) / TTSFRD_RESOURCE


class TextNormalizer:
    """Upstream's ``text_normalize`` with the normalizer upstream would pick here (module doc).

    ``kind``: ``ttsfrd`` or ``wetext`` (``None``: as upstream picks, ttsfrd when it imports and
    initializes, else wetext). ``normalize(text, split, tokenize)`` -> the segments (``split``)
    or the whole normalized text; ``tokenize`` (text -> ids, the policy tokenizer's) measures
    non-Chinese segments, as upstream measures them with its tokenizer."""

    def __init__(self, kind: str | None = None, ttsfrd_resource: str | os.PathLike | None = None):
        self._frd = None
        if kind in (None, "ttsfrd"):
            self._frd = _load_ttsfrd(ttsfrd_resource or ttsfrd_resource_dir())
            if self._frd is None and kind == "ttsfrd":
                raise RuntimeError(f"ttsfrd was asked for but does not import or initialize with "
                                   f"{ttsfrd_resource or ttsfrd_resource_dir()}")
        if self._frd is not None:
            self.kind = "ttsfrd"
        elif kind in (None, "wetext"):
            from wetext import Normalizer

            self._zh = Normalizer(remove_erhua=False)
            self._en = Normalizer()
            self.kind = "wetext"
        else:
            raise ValueError(f"unknown text normalizer {kind!r}; expected ttsfrd or wetext")

    def normalize(self, text: str, split: bool = True, tokenize: Callable[[str], Sequence[int]] | None = None):
        if "<|" in text and "|>" in text or text == "":
            return [text] if split else text
        text = text.strip()
        if self.kind == "ttsfrd":
            sentences = [s["text"] for s in json.loads(self._frd.do_voicegen_frd(text))["sentences"]]
            text = "".join(sentences)
            segments = sentences
        else:
            try:
                segments, text = self._wetext_steps(text, tokenize)
            except IndexError:
                raise FrontendError(f"upstream's text frontend fails on {text!r} (an IndexError in its "
                                    "blank or paragraph rules); rewrite the text") from None
        segments = [s for s in segments if not is_only_punctuation(s)]
        return segments if split else text

    def _wetext_steps(self, text: str, tokenize) -> tuple[list[str], str]:
        if contains_chinese(text):
            text = self._zh.normalize(text)
            text = text.replace("\n", "")
            text = replace_blank(text)
            text = replace_corner_mark(text)
            text = text.replace(".", "。")
            text = text.replace(" - ", "，")
            text = remove_bracket(text)
            text = _TRAILING_COMMAS.sub("。", text)
            return split_paragraph(text, len, chinese=True), text
        text = self._en.normalize(text)
        text = spell_out_number(text)
        if tokenize is not None:
            length = lambda piece: len(tokenize(piece))  # noqa: E731
        elif _utf8_length_bound(text + ".") <= SPLIT_MAX:
            length = _utf8_length_bound  # a bound under the limit: no split, whatever the tokenizer
        else:
            raise NeedsTokenizerError(f"{text!r} may be longer than upstream's {SPLIT_MAX}-token segments; "
                                      "only the policy's tokenizer can tell how upstream splits it (pass it)")
        return split_paragraph(text, length, chinese=False), text


def _load_ttsfrd(resource: str | os.PathLike):
    """ttsfrd's engine initialized as upstream does, or None when it does not import or
    initialize (upstream then falls back to wetext, and so do we)."""
    try:
        import ttsfrd

        engine = ttsfrd.TtsFrontendEngine()
        if engine.initialize(str(resource)) is not True:
            return None
        engine.set_lang_type("pinyinvg")
        return engine
    except Exception:  # noqa: BLE001 - upstream falls back on any failure, so do we
        return None


@functools.lru_cache(maxsize=4)
def default_normalizer(kind: str | None = None) -> TextNormalizer:
    """The process's normalizer (built once: wetext loads its FSTs)."""
    normalizer = TextNormalizer(kind)
    LOGGER.info("text normalization: %s (as upstream CosyVoice picks it)", normalizer.kind)
    return normalizer


# ------------------------------------------------------------------ prompt speech tokens

def resampled_length(samples: int, rate: int, target: int = FLOW_SAMPLE_RATE) -> int:
    """Samples after resampling ``samples`` at ``rate`` to ``target`` (torchaudio's Resample:
    the ceiling of the exact length)."""
    if rate == target:
        return samples
    common = math.gcd(rate, target)
    return -(-samples * (target // common) // (rate // common))


def prompt_token_limit(samples: int, rate: int) -> int:
    """How many prompt speech tokens upstream keeps for a prompt wav of ``samples`` at ``rate``:
    its 24 kHz mel frames over two."""
    return resampled_length(samples, rate) // MEL_HOP // 2


def trim_prompt_tokens(tokens: Sequence[int], samples: int, rate: int) -> list[int]:
    """``tokens[:min(mel_frames // 2, len(tokens))]``, as upstream's ``frontend_zero_shot``
    trims them for 24 kHz models (both families), for the LLM and the flow alike."""
    return list(tokens[:prompt_token_limit(samples, rate)])


def wav_prompt_token_limit(path: str | os.PathLike) -> int:
    """``prompt_token_limit`` of the wav at ``path`` (from its header)."""
    import soundfile

    info = soundfile.info(str(path))
    return prompt_token_limit(int(info.frames), int(info.samplerate))


# ------------------------------------------------------------------ the LLM input

@dataclasses.dataclass(frozen=True)
class PolicyInput:
    """One LLM call of upstream's: what the policy reads and how long it may answer."""

    ids: tuple
    """Token ids of the Hugging Face policy: sos, prompt text, segment, task id, prompt speech."""
    text: str
    """The normalized segment."""
    prompt_text: str
    """The normalized prompt text the LLM reads (CosyVoice3: with its system prefix)."""
    text_tokens: int
    """Tokens of ``text`` (upstream's ``text_len - prompt_text_len``)."""
    min_tokens: int
    max_tokens: int

    def max_new_tokens(self, cap: int | None = None) -> int:
        """``max_tokens``, no more than ``cap`` (a response length limit) when given."""
        return self.max_tokens if cap is None else min(self.max_tokens, int(cap))

    def min_new_tokens(self, cap: int | None = None) -> int:
        """``min_tokens``, no more than the maximum actually allowed."""
        return min(self.min_tokens, self.max_new_tokens(cap))


def llm_prompt_text(family: str | ModelFamily | None, prompt_text: str, text: str) -> str:
    """The prompt text as the family's LLM reads it (before normalization): CosyVoice3's gets
    ``COSYVOICE3_SYSTEM_PREFIX`` in front unless it or the text holds ``<|endofprompt|>``."""
    family = get_family(family)
    if family.chat_template_style == "cosyvoice3" and ENDOFPROMPT_TOKEN not in prompt_text + text:
        return COSYVOICE3_SYSTEM_PREFIX + prompt_text
    return prompt_text


def short_text(segment: str, normalized_prompt_text: str) -> bool:
    """Upstream's warning: the segment has fewer characters than half the prompt text's."""
    return len(segment) < SHORT_TEXT_RATIO * len(normalized_prompt_text)


class PolicyFrontend:
    """Upstream's frontend + LLM input for one policy tokenizer and model family.

    ``tokenizer``: the Hugging Face policy tokenizer (a converted or merged model's), which
    holds the Qwen2 text vocabulary with the family's special text tokens, ``<|sos|>``,
    ``<|task_id|>`` and the speech tokens. ``normalizer``: default ``default_normalizer()``.
    ``min_ratio`` / ``max_ratio``: upstream's 2 and 20 unless a run says otherwise
    (``configs/default.sh``: min_token_text_ratio, max_token_text_ratio)."""

    def __init__(self, tokenizer, family: str | ModelFamily | None = None, normalizer: TextNormalizer | None = None,
                 min_ratio: float = MIN_TOKEN_TEXT_RATIO, max_ratio: float = MAX_TOKEN_TEXT_RATIO):
        from ttsrl.model_family import SOS_TOKEN, TASK_ID_TOKEN

        self.tokenizer = tokenizer
        self.family = get_family(family)
        self._normalizer = normalizer
        if min_ratio < 0 or max_ratio <= 0 or min_ratio > max_ratio:
            raise ValueError(f"token-text ratios must satisfy 0 <= min ({min_ratio}) <= max ({max_ratio}), max > 0")
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)
        self.sos_id, self.task_id = self._single_id(SOS_TOKEN), self._single_id(TASK_ID_TOKEN)
        self.speech_offset = self._single_id("<|s_0|>")

    @property
    def normalizer(self) -> TextNormalizer:
        if self._normalizer is None:
            self._normalizer = default_normalizer()
        return self._normalizer

    def _single_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"the policy tokenizer has no {token} token: not a converted {self.family.name} model")
        return int(ids[0])

    def text_ids(self, text: str) -> list[int]:
        """Upstream's ``_extract_text_token``: the tokenizer called on the text alone."""
        if not text:
            return []
        return list(self.tokenizer([text])["input_ids"][0])

    def normalize_text(self, text: str) -> list[str]:
        """The text's segments (one LLM call each); FrontendError when none is left."""
        segments = self.normalizer.normalize(text, split=True, tokenize=self.text_ids)
        if not segments or not any(segments):
            raise FrontendError(f"text {text!r} normalizes to nothing to say (upstream's text frontend leaves "
                                "no segment)")
        return segments

    def normalize_prompt_text(self, prompt_text: str, text: str = "") -> str:
        """The prompt text as the LLM reads it, normalized (CosyVoice3: its prefix, not normalized)."""
        prompt_text = llm_prompt_text(self.family, prompt_text, text)
        if not prompt_text:
            return ""
        return self.normalizer.normalize(prompt_text, split=False, tokenize=self.text_ids)

    def speech_ids(self, tokens: Sequence[int]) -> list[int]:
        return [self.speech_offset + int(t) for t in tokens]

    def build(self, segment: str, normalized_prompt_text: str = "", prompt_tokens: Sequence[int] = ()) -> PolicyInput:
        """The LLM input of one normalized segment (upstream's ``inference`` layout)."""
        text_ids = self.text_ids(segment)
        ids = ([self.sos_id] + self.text_ids(normalized_prompt_text) + text_ids + [self.task_id]
               + self.speech_ids(prompt_tokens))
        return PolicyInput(tuple(ids), segment, normalized_prompt_text, len(text_ids),
                           int(len(text_ids) * self.min_ratio), int(len(text_ids) * self.max_ratio))

    def inputs(self, text: str, prompt_text: str = "", prompt_tokens: Sequence[int] = ()) -> list[PolicyInput]:
        """Every LLM call of ``text`` (raw) in the voice of a prompt (raw transcript, speech
        tokens already trimmed: ``trim_prompt_tokens``)."""
        # Without speech tokens there is no speaker prompt for the LLM (upstream's cross-lingual
        # input): its transcript is dropped too, and CosyVoice3 reads its system prefix alone.
        prompt = self.normalize_prompt_text(prompt_text if len(prompt_tokens) else "", text)
        return [self.build(segment, prompt, prompt_tokens) for segment in self.normalize_text(text)]


def policy_frontend(model_dir: str | os.PathLike, tokenizer=None, **options) -> PolicyFrontend:
    """The frontend of a converted or merged policy directory (its family from config.json)."""
    from ttsrl.model_family import family_of_hf_dir

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return PolicyFrontend(tokenizer, family_of_hf_dir(model_dir), **options)


# ------------------------------------------------------------------ stage 0's rows

def row_policy_input(frontend: PolicyFrontend, extra_info, messages) -> PolicyInput:
    """The LLM input of a stage-0 row (``ttsrl.training.data``): its ``extra_info``'s
    ``normalized_text`` and ``llm_prompt_text``, and the prompt speech tokens of its assistant
    message. FrontendError naming the row when it was written for another family or before
    stage 0 recorded the normalized text."""
    from ttsrl.speech_tokens import parse_speech_tokens

    info = extra_info if isinstance(extra_info, dict) else {}
    where = f"row {info.get('split', '?')}:{info.get('index', '?')}"
    text = info.get("normalized_text")
    if not isinstance(text, str) or not text:
        raise FrontendError(f"{where} has no normalized_text: its parquet comes from a stage 0 before the policy read "
                            "upstream CosyVoice's input; rerun stage 0 (bash run.sh --force 0 0)")
    family = info.get("model_family")
    if family and family != frontend.family.name:
        raise FrontendError(f"{where} was prepared for {family} but the policy is {frontend.family.name}; rerun "
                            f"stage 0 with model_family={frontend.family.name}")
    speech = ""
    for message in list(messages if messages is not None else []):
        if message.get("role") == "assistant":
            speech = message.get("content") or ""
    tokens = parse_speech_tokens(speech, frontend.family).ids if speech else []
    return frontend.build(text, info.get("llm_prompt_text") or "", tokens)
