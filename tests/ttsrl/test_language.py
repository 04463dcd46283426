import pytest

from ttsrl.language import FALLBACK_LANGUAGE, LANGUAGES, detect_language, normalize_language


@pytest.mark.parametrize("text,language", [
    ("今天天气很好。", "zh"),
    ("The weather is nice today.", "en"),
    ("今日はいい天気ですね。", "ja"),
    ("カタカナだけ", "ja"),
    ("오늘 날씨가 좋네요.", "ko"),
    # mixed text: the documented rules
    ("我们用Python写代码", "zh"),          # Han characters outnumber Latin words
    ("打开 the big red door now", "en"),   # 5 Latin words outnumber 2 Han characters
])
def test_detect_language_from_the_script(text, language):
    assert detect_language(text) == language


def test_kana_and_hangul_win_over_han_and_latin():
    assert detect_language("東京大学へ行く and more English words here") == "ja"
    assert detect_language("韓國 한국 Seoul Korea") == "ko"


def test_text_without_a_script_gets_the_fallback():
    assert FALLBACK_LANGUAGE in LANGUAGES
    assert detect_language("12345 ...!") == FALLBACK_LANGUAGE
    assert detect_language("Привет мир") == FALLBACK_LANGUAGE


@pytest.mark.parametrize("value,language", [
    ("zh", "zh"), ("ZH", "zh"), ("cmn", "zh"), ("zh-CN", "zh"), ("zh_cn", "zh"), (" en ", "en"), ("en-US", "en"),
    ("en_gb", "en"), ("ja", "ja"), ("jpn", "ja"), ("ko", "ko"), ("ko-KR", "ko"),
])
def test_normalize_language_accepts_aliases(value, language):
    assert normalize_language(value, "x") == language


def test_unknown_language_names_value_place_and_allowed():
    with pytest.raises(ValueError) as error:
        normalize_language("klingon", "data.jsonl:3")
    message = str(error.value)
    assert "data.jsonl:3" in message and "'klingon'" in message and "'zh', 'en', 'ja', 'ko'" in message
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="item 7"):
            normalize_language(bad, "item 7")
