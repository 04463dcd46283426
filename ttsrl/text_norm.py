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
