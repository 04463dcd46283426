"""Text normalization for scoring, and the admissible readings of numbers.

``normalize_text`` is the canonical form both sides of a comparison go
through: NFKC (full width -> half width), wetext's Chinese text normalization
when the text has digits (dates, units, percentages, decimals), lower case,
punctuation and symbols removed, whitespace collapsed.

A digit string has more than one correct reading: 2024 is 两千零二十四 or
二零二四, 138 is 一百三十八, 一三八 or 幺三八. Scoring against one normalizer's
guess would teach the policy that guess, so ``reading_slots`` describes a text
as fixed pieces and number slots, each slot listing every reading we accept;
``ttsrl.scoring`` picks the reading that matches the hypothesis best.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

HAN_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
"""Character ranges treated as Han (CJK ideographs) everywhere in scoring."""
_HAN = re.compile(f"[{HAN_CHARS}]")
_DIGIT = re.compile(r"\d")
# A number as written: integer, or decimal with a fractional part.
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DIGIT_READING = "零一二三四五六七八九"
_GROUP_UNITS = ("", "万", "亿", "万亿")
_MAX_CARDINAL_DIGITS = 16


@lru_cache(maxsize=1)
def _wetext_normalizer():
    # Imported lazily: loading the FSTs costs ~0.1 s and most text has no digits.
    from wetext import Normalizer

    return Normalizer(lang="zh", operator="tn", remove_erhua=False, remove_interjections=False)


def _is_punct_or_symbol(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


@lru_cache(maxsize=4096)
def _cleanup_table_char(char: str) -> str:
    return " " if _is_punct_or_symbol(char) else char


def join_pieces(pieces) -> str:
    """Join normalized pieces with a space only where both sides are non-Han.

    Spaces between Han characters would split pypinyin's word segmentation
    (and with it tone sandhi and polyphone choice), and ASR transcripts have
    none, so they are dropped; a space between Latin words is kept.
    """
    out = ""
    for piece in pieces:
        if not piece:
            continue
        if out and not _HAN.match(out[-1]) and not _HAN.match(piece[0]):
            out += " "
        out += piece
    return out


def _clean(text: str) -> str:
    """Lower case, punctuation/symbols removed, whitespace kept only between non-Han words.

    An apostrophe between two Latin letters is kept (don't, it's).
    """
    text = text.lower()
    out = []
    last = len(text) - 1
    for i, char in enumerate(text):
        if char == "'" and 0 < i < last and text[i - 1].isascii() and text[i - 1].isalpha() \
                and text[i + 1].isascii() and text[i + 1].isalpha():
            out.append(char)
        else:
            out.append(_cleanup_table_char(char))
    return join_pieces("".join(out).split())


def normalize_text(text: str) -> str:
    """The canonical form of ``text`` for comparison (see module doc)."""
    text = unicodedata.normalize("NFKC", text)
    if _DIGIT.search(text):
        text = _wetext_normalizer().normalize(text)
    return _clean(text)


def digit_readings(digits: str) -> list[str]:
    """Digit-by-digit readings: 一 or 幺 for 1 (幺 in phone numbers, room numbers)."""
    plain = "".join(_DIGIT_READING[int(d)] for d in digits)
    readings = [plain]
    if "1" in digits:
        readings.append(plain.replace("一", "幺"))
    return readings


def _group_reading(value: int) -> str:
    """0 < value < 10000, full form (一十 kept; callers shorten a leading 一十)."""
    out = []
    pending_zero = False
    for digit, unit in zip((value // 1000, value // 100 % 10, value // 10 % 10, value % 10), "千百十 "):
        if digit == 0:
            pending_zero = bool(out)
            continue
        if pending_zero:
            out.append("零")
            pending_zero = False
        out.append(_DIGIT_READING[digit] + unit.strip())
    return "".join(out)


def cardinal_reading(value: int) -> str:
    """The standard cardinal reading: 2024 -> 二千零二十四, 15 -> 十五, 10050 -> 一万零五十."""
    if value < 0 or value >= 10 ** _MAX_CARDINAL_DIGITS:
        raise ValueError(f"cardinal reading needs 0 <= value < 10^{_MAX_CARDINAL_DIGITS}, got {value}")
    if value == 0:
        return "零"
    groups = []
    while value:
        groups.append(value % 10000)
        value //= 10000
    out = ""
    pending_zero = False
    for position in range(len(groups) - 1, -1, -1):
        group = groups[position]
        if group == 0:
            pending_zero = bool(out)
            continue
        if out and (group < 1000 or pending_zero):
            out += "零"
        out += _group_reading(group) + _GROUP_UNITS[position]
        pending_zero = False
    if out.startswith("一十"):
        out = out[1:]
    return out


def cardinal_readings(digits: str) -> list[str]:
    """Accepted cardinal readings of an integer digit string (none for 0-prefixed codes).

    Variants: 两 for 2 before 百/千/万/亿 (两千 and 二千 are both said), and
    一十 for a leading 十 (一十五 as well as 十五).
    """
    if (len(digits) > 1 and digits[0] == "0") or len(digits) > _MAX_CARDINAL_DIGITS:
        return []
    base = cardinal_reading(int(digits))
    readings = [base]
    liang = re.sub("二(?=[百千万亿])", "两", base)
    if liang != base:
        readings.append(liang)
    if base.startswith("十"):
        readings += ["一" + r for r in list(readings)]
    return readings


def number_readings(number: str) -> list[str]:
    """Every reading we accept for a written number (integer or decimal)."""
    integer, _, fraction = number.partition(".")
    integer_readings = cardinal_readings(integer) + digit_readings(integer)
    if not fraction:
        return _unique(integer_readings)
    fraction_readings = digit_readings(fraction)
    return _unique(i + "点" + f for i in integer_readings for f in fraction_readings)


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class ReadingSlots:
    """A text as pieces: ``str`` pieces are fixed, ``tuple`` pieces are alternatives.

    ``guess`` is wetext's whole-text normalization, kept as one more complete
    reading because it understands context our digit slots do not (units,
    percentages, times: 3kg -> 三千克, 50% -> 百分之五十).
    """

    pieces: tuple
    guess: str

    @property
    def has_numbers(self) -> bool:
        return any(isinstance(piece, tuple) for piece in self.pieces)


@lru_cache(maxsize=65536)
def reading_slots(text: str) -> ReadingSlots:
    """Split ``text`` into fixed normalized pieces and number slots."""
    nfkc = unicodedata.normalize("NFKC", text)
    guess = normalize_text(nfkc)
    pieces: list = []
    position = 0
    for match in _NUMBER.finditer(nfkc):
        pieces.append(_clean(nfkc[position:match.start()]))
        pieces.append(tuple(number_readings(match.group(0))))
        position = match.end()
    pieces.append(_clean(nfkc[position:]))
    return ReadingSlots(pieces=tuple(p for p in pieces if p != ""), guess=guess)


# ---- English: Whisper-style normalization (WER) ------------------------------------------
# openai-whisper's EnglishTextNormalizer is installed in the server environment only, and
# this module must import in both, so this is our own smaller normalizer following the same
# documented rules; tests/ttsrl/test_text_norm.py checks it against Whisper's where the
# server environment has it. Left out on purpose: British -> American spellings (Whisper's
# 1,700-word table), ordinals (first -> 1st) and currency words (dollars -> $).
_BRACKETED = re.compile(r"[<\[][^\]>]*[\]>]|\([^)]*\)")
_FILLERS = re.compile(r"\b(?:hmm|mm|mhm|mmm|uh|um)\b")
_SPECIAL_CONTRACTIONS = ((re.compile(r"\bwon't\b"), "will not"), (re.compile(r"\bcan't\b"), "can not"),
                         (re.compile(r"\blet's\b"), "let us"), (re.compile(r"\bain't\b"), "is not"))
_CONTRACTIONS = ((re.compile(r"n't\b"), " not"), (re.compile(r"'re\b"), " are"), (re.compile(r"'s\b"), " is"),
                 (re.compile(r"'d\b"), " would"), (re.compile(r"'ll\b"), " will"), (re.compile(r"'ve\b"), " have"),
                 (re.compile(r"'m\b"), " am"))
_TITLES = {"mr": "mister", "mrs": "missus", "ms": "miss", "dr": "doctor", "prof": "professor", "st": "saint",
           "jr": "junior", "sr": "senior", "capt": "captain", "gen": "general", "sen": "senator", "rep":
           "representative", "gov": "governor", "lt": "lieutenant", "sgt": "sergeant"}
_TITLE = re.compile(r"\b(" + "|".join(_TITLES) + r")\b\.?")
_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_MULTIPLIERS = {"hundred": 100, "thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9, "trillion": 10 ** 12}
# Symbols Whisper keeps (a period only between digits: 3.5).
_KEPT_SYMBOLS = "%$"


def _strip_diacritics(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _english_symbols_removed(text: str) -> str:
    out = []
    for i, char in enumerate(text):
        if char in _KEPT_SYMBOLS or char.isalnum() or char.isspace():
            out.append(char)
        elif char == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
            out.append(char)
        else:
            out.append(" ")
    return "".join(out)


class _NumberRun:
    """Spelled-out number words -> digits, the way Whisper joins them: a cardinal phrase is one
    number (one hundred and twenty three -> 123), and numbers said one after another are
    written one after another (one two three -> 123, twenty twenty -> 2020)."""

    def __init__(self):
        self.parts: list[str] = []  # finished numbers, concatenated at the end
        self.total = 0  # the current number: total + group
        self.group = 0
        self.last = ""  # "unit", "teen", "tens", "multiplier" or ""

    def _finish(self) -> None:
        if self.last:
            self.parts.append(str(self.total + self.group))
        self.total = self.group = 0
        self.last = ""

    def add(self, word: str) -> None:
        if word in _MULTIPLIERS:
            factor = _MULTIPLIERS[word]
            if not self.last:
                self.group = 1
            if factor == 100:
                self.group = (self.group or 1) * 100
            else:
                self.total += (self.group or 1) * factor
                self.group = 0
            self.last = "multiplier"
            return
        value = _UNITS.get(word, _TENS.get(word))
        kind = "tens" if word in _TENS else ("teen" if value >= 10 else "unit")
        # A unit may follow a tens word (twenty five) or a multiplier; anything else starts anew.
        joins = (self.last == "multiplier" and self.group % 100 == 0) or (self.last == "tens" and kind == "unit")
        if self.last and not joins:
            self._finish()
        self.group += value
        self.last = kind

    def text(self) -> str:
        self._finish()
        return "".join(self.parts)


def _english_numbers(words: list) -> list:
    out: list = []
    run: _NumberRun | None = None
    for index, word in enumerate(words):
        is_number = word in _UNITS or word in _TENS or (word in _MULTIPLIERS and run is not None)
        # "and" inside a cardinal (one hundred and five), not between two numbers said apart.
        if word == "and" and run is not None and run.last == "multiplier" and index + 1 < len(words) \
                and (words[index + 1] in _UNITS or words[index + 1] in _TENS):
            continue
        if is_number:
            run = run or _NumberRun()
            run.add(word)
            continue
        if run is not None:
            out.append(run.text())
            run = None
        if word == "percent" and out and out[-1][-1:].isdigit():
            out[-1] += "%"
            continue
        out.append(word)
    if run is not None:
        out.append(run.text())
    return out


@lru_cache(maxsize=65536)
def normalize_english(text: str) -> str:
    """English text as Whisper's EnglishTextNormalizer writes it, in short: lower case;
    bracketed asides ([laughs], (noise), <unk>) and fillers (um, uh, hmm) removed; contractions
    spelled out (won't -> will not, smith's -> smith is); titles spelled out (mr -> mister,
    dr -> doctor, st -> saint); diacritics dropped (cafe); spelled-out numbers as digits
    (twenty five -> 25, one hundred and three -> 103, 25 percent -> 25%); punctuation and
    symbols removed except ``%``, ``$`` and a decimal point; whitespace collapsed."""
    text = _strip_diacritics(unicodedata.normalize("NFKC", text)).lower().replace("\u2019", "'")
    text = _BRACKETED.sub(" ", text)
    text = _FILLERS.sub(" ", text)
    for pattern, replacement in _SPECIAL_CONTRACTIONS + _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    text = _TITLE.sub(lambda match: _TITLES[match.group(1)] + " ", text)
    text = _english_symbols_removed(text.replace("-", " "))
    return " ".join(_english_numbers(text.split()))


def normalize_characters(text: str) -> str:
    """Text for a character error rate (ja, ko): NFKC (full width -> half width), lower case,
    punctuation, symbols and whitespace removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if not c.isspace() and not _is_punct_or_symbol(c))
