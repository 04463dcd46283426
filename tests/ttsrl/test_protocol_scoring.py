"""The Seed-TTS-eval protocol's CER/WER, checked on cases counted by hand."""
import pytest

from ttsrl.protocol_scoring import mean_error_rate, metric_of, protocol_align, protocol_tokens
from ttsrl.scoring import EmptyReferenceError


def test_zh_cer_by_hand():
    # Reference: 今天天气很好 (6 characters; the comma, the exclamation mark and the space go).
    # Transcript in traditional characters: 今天天氣很好嗎 -> simplified 今天天气很好吗: one insertion.
    alignment = protocol_align("今天，天气 很好！", "今天天氣很好嗎", "zh")
    assert alignment.reference == tuple("今天天气很好")
    assert alignment.hypothesis == tuple("今天天气很好吗")
    assert (alignment.substitutions, alignment.deletions, alignment.insertions) == (0, 0, 1)
    assert alignment.error_rate == pytest.approx(1 / 6)
    # No number reading and no case folding in zh: "2" vs 二 and "A" vs "a" are substitutions;
    # Latin words are split into letters. Reference 第2课A (4 tokens) vs 第二课a: 2 substitutions.
    assert protocol_align("第2课A", "第二课a", "zh").error_rate == pytest.approx(2 / 4)
    assert metric_of("zh") == "cer"


def test_en_wer_by_hand():
    # Reference words: hello world it's a wellknown fact (6; the hyphen and punctuation go,
    # the apostrophe stays). Transcript: hello world its a well known fact:
    # it's->its (sub), wellknown->well (sub), known (ins) = 3 errors / 6 words.
    alignment = protocol_align("Hello, world! It's a well-known fact.", "hello world its a well known fact", "en")
    assert alignment.reference == ("hello", "world", "it's", "a", "wellknown", "fact")
    assert (alignment.substitutions, alignment.deletions, alignment.insertions) == (2, 0, 1)
    assert alignment.error_rate == pytest.approx(0.5)
    # A missing word is a deletion; case does not matter in en.
    assert protocol_align("The cat sat.", "THE CAT", "en").error_rate == pytest.approx(1 / 3)
    assert metric_of("en") == "wer"


def test_ja_and_ko_cer_by_hand():
    # ja: characters without punctuation and spaces (9): 今日は良い天気です; the transcript's
    # でした for です is one substitution and one insertion.
    alignment = protocol_align("今日は、良い 天気です。", "今日は良い天気でした", "ja")
    assert alignment.reference == tuple("今日は良い天気です")
    assert (alignment.substitutions, alignment.deletions, alignment.insertions) == (1, 0, 1)
    assert alignment.error_rate == pytest.approx(2 / 9)
    # no traditional -> simplified conversion outside zh: kanji stay as written
    assert protocol_tokens("國語", "ja", hypothesis=True) == ("國", "語")
    assert protocol_tokens("國語", "zh", hypothesis=True) == ("国", "语")
    # ko: Hangul syllables are the tokens (10); 습 dropped is one deletion
    alignment = protocol_align("안녕하세요, 반갑습니다!", "안녕하세요 반갑니다", "ko")
    assert alignment.reference == tuple("안녕하세요반갑습니다")
    assert (alignment.substitutions, alignment.deletions, alignment.insertions) == (0, 1, 0)
    assert alignment.error_rate == pytest.approx(1 / 10)
    assert (metric_of("ja"), metric_of("ko")) == ("cer", "cer")


def test_the_set_figure_is_the_mean_of_utterance_rates():
    rates = [protocol_align("你好", "你好", "zh").error_rate, protocol_align("你好吗", "", "zh").error_rate]
    assert mean_error_rate(rates) == pytest.approx(0.5)  # not 3 errors / 5 characters
    assert mean_error_rate([]) is None  # no utterance with audio: no figure, not a perfect 0.0


def test_errors():
    with pytest.raises(EmptyReferenceError):
        protocol_align("。！", "你好", "zh")
    with pytest.raises(ValueError, match="unknown language"):
        protocol_tokens("x", "fr")
    assert protocol_tokens("「你好」——《世界》", "zh") == tuple("你好世界")
