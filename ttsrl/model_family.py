"""What a policy model family is: the one home of every fact that differs between CosyVoice2 and
CosyVoice3 (speech vocabulary, special rows, stop tokens, token names, prompt layout, text
tokenizer, llm.pt key layout, token2wav engines, speech tokenizer, download).

Both LLMs are a Qwen2 backbone that reads speech tokens 0..6560 (a 6561-entry FSQ codebook)
through its own ``speech_embedding`` and writes them through its own ``llm_decoder``; the
rows after 6560 are special, and that is where the families differ:

``cosyvoice2`` (upstream ``Qwen2LM``): 6561 + 3 speech rows, ``llm_decoder`` with a bias; the
three extra rows (6561 eos, 6562, 6563 fill) all stop generation and are named
``<|eos1|>``..``<|eos3|>``; sos and task id are the two rows of a separate ``llm_embedding``,
named ``<|sos|>`` and ``<|task_id|>``.

``cosyvoice3`` (upstream ``CosyVoice3LM``): 6561 + 200 speech rows, ``llm_decoder`` without a
bias, no ``llm_embedding``: sos = 6561, eos = 6562, task id = 6563, fill = 6564 are speech rows,
and all 200 extra rows stop generation. Named as upstream's TensorRT-LLM conversion names them
(``<|sos|>``, ``<|eos1|>``, ``<|task_id|>``, ``<|fill|>``, then ``<|s_6565|>``..``<|s_6760|>``),
so the prompt layout ``<|sos|>`` text ``<|task_id|>`` reads the same in both families. Its text
must contain ``<|endofprompt|>`` (upstream asserts it), so its chat template puts the system
prefix in front of a user turn that lacks one.

Standard library only: both environments import it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPEECH_VOCAB_SIZE = 6561
"""Real speech tokens of both families: ids 0..6560."""

HF_FAMILY_KEY = "ttsrl_model_family"
"""config.json (and conversion report) entry naming the family of a converted Hugging Face directory."""

SOS_TOKEN = "<|sos|>"
TASK_ID_TOKEN = "<|task_id|>"
ENDOFPROMPT_TOKEN = "<|endofprompt|>"

COSYVOICE2_TEXT_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", ENDOFPROMPT_TOKEN, "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
)
"""Special text tokens CosyVoice2's frontend (``CosyVoice2Tokenizer``) adds to the Qwen2 tokenizer,
in its order. With ``<|endoftext|>`` as eos and pad they make its text ids."""

_ARPABET_VOWELS = "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split()
_ARPABET_CONSONANTS = "B CH D DH F G HH JH K L M N NG P R S SH T TH V W Y Z ZH".split()
_PINYIN_UNITS = (
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié iòng "
    "ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t u "
    "uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī uō uǎ uǎi "
    "uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í "
    "ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn "
    "ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
).split()


def _cosyvoice3_phoneme_tokens() -> tuple[str, ...]:
    """CosyVoice3's phoneme text tokens: CMU ARPAbet phones (each vowel bare and with stress
    0/1/2), then pinyin initials and toned finals; each group in code-point order."""
    arpabet = sorted([v + s for v in _ARPABET_VOWELS for s in ("", "0", "1", "2")] + _ARPABET_CONSONANTS)
    return tuple(f"[{unit}]" for unit in arpabet + sorted(_PINYIN_UNITS))


COSYVOICE3_TEXT_SPECIAL_TOKENS = COSYVOICE2_TEXT_SPECIAL_TOKENS + ("<|endofsystem|>",) + _cosyvoice3_phoneme_tokens()
"""... and those of CosyVoice3's frontend (``CosyVoice3Tokenizer``), in its order."""

COSYVOICE3_SYSTEM_PREFIX = "You are a helpful assistant." + ENDOFPROMPT_TOKEN
"""What upstream's CosyVoice3 serving puts before a text that lacks ``<|endofprompt|>``."""


class UnknownFamilyError(ValueError):
    """A family name, llm.pt or Hugging Face directory that is no known family."""


class WrongFamilyError(ValueError):
    """A model of one family where the configuration asks for the other."""


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One policy model family (see the module docstring for the two); one instance per family, so
    families compare by identity."""

    name: str
    speech_rows: int
    """Rows of ``speech_embedding`` and outputs of ``llm_decoder`` (6561 + extra rows)."""
    extra_row_tokens: tuple[str, ...]
    """HF token names of the speech rows 6561.. (in row order)."""
    llm_embedding_tokens: tuple[str, ...]
    """HF token names of the ``llm_embedding`` rows (empty when the family has none)."""
    special_ids: dict
    """Upstream ids of sos, eos, task_id, fill: ``("speech", row)`` or ``("llm_embedding", row)``."""
    stop_tokens: tuple[str, ...]
    """HF token names at which generation stops (upstream's ``stop_token_ids``)."""
    llm_decoder_bias: bool
    """Whether ``llm_decoder`` has a bias (the HF lm_head cannot carry one)."""
    chat_template_style: str
    """Key of ``ttsrl.chat_template.TEMPLATES``."""
    text_tokenizer: str
    """Upstream frontend tokenizer class (``cosyvoice/tokenizer/tokenizer.py``)."""
    text_special_tokens: tuple[str, ...]
    """Special text tokens that frontend adds to the Qwen2 tokenizer, in its order."""
    upstream_llm_class: str
    """The upstream LLM class (``cosyvoice/llm/llm.py``)."""
    token2wav_engines: str
    """``module:function`` factory of the reward server's real engines for this family."""
    speech_tokenizer_file: str
    """The speech tokenizer's file name in the pretrained directory."""
    modelscope_id: str
    pretrained_dir_name: str
    """Directory name of the ModelScope download (last part of its id)."""
    llm_file: str = "llm.pt"
    hyperparameters_file: str = ""
    """Upstream's yaml in the pretrained directory."""

    @property
    def speech_vocab_size(self) -> int:
        return SPEECH_VOCAB_SIZE

    @property
    def eos_token(self) -> str:
        """HF name of the eos row (what a training target ends with): ``<|eos1|>`` in both families."""
        _, row = self.special_ids["eos"]
        return self.extra_row_tokens[row - SPEECH_VOCAB_SIZE]

    @property
    def stop_row_ids(self) -> tuple[int, ...]:
        """Upstream speech-row ids of ``stop_tokens``."""
        return tuple(SPEECH_VOCAB_SIZE + self.extra_row_tokens.index(t) for t in self.stop_tokens)

    @property
    def added_rows(self) -> int:
        """Tokens the HF conversion appends to the text vocabulary."""
        return self.speech_rows + len(self.llm_embedding_tokens)

    def added_tokens(self) -> list[str]:
        """Every token the HF conversion appends to the text vocabulary, in order: the speech rows
        (``<|s_0|>``..``<|s_6560|>``, then ``extra_row_tokens``), then ``llm_embedding_tokens``."""
        return [f"<|s_{i}|>" for i in range(SPEECH_VOCAB_SIZE)] + list(self.extra_row_tokens) + list(
            self.llm_embedding_tokens)

    @property
    def llm_pt_keys(self) -> tuple[str, ...]:
        """The non-backbone keys of this family's ``llm.pt`` (what identifies it)."""
        keys = ["speech_embedding.weight", "llm_decoder.weight"]
        if self.llm_decoder_bias:
            keys.append("llm_decoder.bias")
        if self.llm_embedding_tokens:
            keys.append("llm_embedding.weight")
        return tuple(keys)


COSYVOICE2 = ModelFamily(
    name="cosyvoice2",
    speech_rows=SPEECH_VOCAB_SIZE + 3,
    extra_row_tokens=("<|eos1|>", "<|eos2|>", "<|eos3|>"),
    llm_embedding_tokens=(SOS_TOKEN, TASK_ID_TOKEN),
    special_ids={"sos": ("llm_embedding", 0), "task_id": ("llm_embedding", 1), "eos": ("speech", 6561),
                 "fill": ("speech", 6563)},
    stop_tokens=("<|eos1|>", "<|eos2|>", "<|eos3|>"),
    llm_decoder_bias=True,
    chat_template_style="cosyvoice2",
    text_tokenizer="CosyVoice2Tokenizer",
    text_special_tokens=COSYVOICE2_TEXT_SPECIAL_TOKENS,
    upstream_llm_class="Qwen2LM",
    token2wav_engines="token2wav_server.engines_cosyvoice2:create_engines",
    speech_tokenizer_file="speech_tokenizer_v2.onnx",
    modelscope_id="iic/CosyVoice2-0.5B",
    pretrained_dir_name="CosyVoice2-0.5B",
    hyperparameters_file="cosyvoice2.yaml",
)

_COSYVOICE3_EXTRA = (SOS_TOKEN, "<|eos1|>", TASK_ID_TOKEN, "<|fill|>") + tuple(
    f"<|s_{SPEECH_VOCAB_SIZE + i}|>" for i in range(4, 200))

COSYVOICE3 = ModelFamily(
    name="cosyvoice3",
    speech_rows=SPEECH_VOCAB_SIZE + 200,
    extra_row_tokens=_COSYVOICE3_EXTRA,
    llm_embedding_tokens=(),
    special_ids={"sos": ("speech", 6561), "eos": ("speech", 6562), "task_id": ("speech", 6563),
                 "fill": ("speech", 6564)},
    stop_tokens=_COSYVOICE3_EXTRA,
    llm_decoder_bias=False,
    chat_template_style="cosyvoice3",
    text_tokenizer="CosyVoice3Tokenizer",
    text_special_tokens=COSYVOICE3_TEXT_SPECIAL_TOKENS,
    upstream_llm_class="CosyVoice3LM",
    token2wav_engines="token2wav_server.engines_cosyvoice3:create_engines",
    speech_tokenizer_file="speech_tokenizer_v3.onnx",
    modelscope_id="FunAudioLLM/Fun-CosyVoice3-0.5B-2512",
    pretrained_dir_name="Fun-CosyVoice3-0.5B-2512",
    hyperparameters_file="cosyvoice3.yaml",
)

FAMILIES = {f.name: f for f in (COSYVOICE2, COSYVOICE3)}
DEFAULT_FAMILY = COSYVOICE2
"""What every caller that names no family gets (the recipe's behaviour before CosyVoice3)."""


def get_family(name: "str | ModelFamily | None" = None) -> ModelFamily:
    """The family called ``name`` (a ``ModelFamily`` passes through; None: the default)."""
    if name is None:
        return DEFAULT_FAMILY
    if isinstance(name, ModelFamily):
        return name
    if name not in FAMILIES:
        raise UnknownFamilyError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


FAMILY_ENV = "TTSRL_MODEL_FAMILY"
"""run.sh exports its model_family here, for the processes that parse policy responses with no
model directory at hand (the veRL reward hook, the trainer's validation audio)."""


def family_from_env(environ=None) -> ModelFamily:
    """The family ``TTSRL_MODEL_FAMILY`` names (unset: the default); a bad name is an error."""
    import os

    name = (os.environ if environ is None else environ).get(FAMILY_ENV) or None
    try:
        return get_family(name)
    except UnknownFamilyError as error:
        raise UnknownFamilyError(f"{FAMILY_ENV}={name!r}: {error}") from None


def family_of_llm_state_dict(state_dict: dict, source: "str | Path" = "llm.pt") -> ModelFamily:
    """The family of an upstream ``llm.pt`` state dict, from its keys and the speech row count.

    ``source`` names it in the error when it is neither family's layout."""
    rows = getattr(state_dict.get("speech_embedding.weight"), "shape", (None,))[0]
    extra = set(state_dict) - {k for k in state_dict if k.startswith("llm.model.")}
    for family in FAMILIES.values():
        if rows == family.speech_rows and extra == set(family.llm_pt_keys):
            return family
    described = ", ".join(f"{f.name}: keys {sorted(f.llm_pt_keys)} with {f.speech_rows} speech rows"
                          for f in FAMILIES.values())
    raise UnknownFamilyError(f"{source}: not a CosyVoice2 or CosyVoice3 llm.pt (non-backbone keys {sorted(extra)}, "
                             f"speech_embedding rows {rows}); expected {described}")


def family_of_hf_dir(path: "str | Path") -> ModelFamily:
    """The family a converted Hugging Face directory records in config.json (``HF_FAMILY_KEY``).

    A directory converted before families existed records none and is cosyvoice2."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UnknownFamilyError(f"{path}: no config.json (expected a converted Hugging Face model directory)")
    name = json.loads(config_file.read_text()).get(HF_FAMILY_KEY, COSYVOICE2.name)
    try:
        return get_family(name)
    except UnknownFamilyError as error:
        raise UnknownFamilyError(f"{config_file}: {HF_FAMILY_KEY} = {name!r}: {error}") from None


def check_family(expected: "str | ModelFamily", found: "str | ModelFamily", what: "str | Path") -> ModelFamily:
    """``found`` (the family of ``what``, a path or description) must be ``expected``, the
    configured one; else ``WrongFamilyError`` naming both and the way out. Returns the family."""
    expected, found = get_family(expected), get_family(found)
    if expected is not found:
        kind = "llm.pt" if str(what).endswith(".pt") else "model"
        raise WrongFamilyError(
            f"{what} is a {found.name} {kind} but model_family={expected.name}; point {expected.name}_dir at a "
            f"{expected.pretrained_dir_name} download (or a conversion of one) or set model_family={found.name}")
    return found


def main(argv: "list[str] | None" = None) -> int:
    """``python -m ttsrl.model_family FAMILY FIELD``: print one fact of a family (for the shell
    recipe, in either environment), e.g. ``cosyvoice3 modelscope_id``; tuples print one per line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ttsrl.model_family", description=main.__doc__.split("\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("field", help="a ModelFamily field or property, e.g. modelscope_id, token2wav_engines")
    args = parser.parse_args(argv)
    family = get_family(args.family)
    if args.field.startswith("_") or not hasattr(family, args.field) or callable(getattr(family, args.field)):
        parser.error(f"unknown field {args.field!r}; known: "
                     f"{', '.join(sorted(n for n in dir(family) if not n.startswith('_') and not callable(getattr(family, n))))}")
    value = getattr(family, args.field)
    print("\n".join(map(str, value)) if isinstance(value, tuple) else value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
