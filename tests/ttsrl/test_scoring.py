import pytest
from pypinyin import Style, lazy_pinyin

from ttsrl.scoring import EmptyReferenceError, align, error_rate, han_pinyin, tokenize


def test_identical_texts_score_zero():
    for metric in ("pinyin", "char"):
        assert error_rate("今天天气很好，我们去公园。", "今天天气很好，我们去公园。", metric) == 0.0


def test_punctuation_width_and_case_do_not_count():
    assert error_rate("你好，世界！Hello World.", "你好世界 hello world", "char") == 0.0
    assert error_rate("ＡＢＣ测试", "abc测试") == 0.0


def test_homophones_with_same_tones():
    assert error_rate("他们来了", "她们来了", "pinyin") == 0.0
    assert error_rate("他们来了", "她们来了", "char") == pytest.approx(0.25)


def test_empty_hypothesis_and_empty_reference():
    result = align("你好世界", "")
    assert result.error_rate == 1.0 and result.deletions == 4
    with pytest.raises(EmptyReferenceError):
        align("。。！", "你好")
    with pytest.raises(EmptyReferenceError):
        align("", "你好")


def test_edit_counts():
    result = align("我们去公园", "我们去了公园玩", "char")
    assert (result.substitutions, result.deletions, result.insertions, result.ref_length) == (0, 0, 2, 5)
    result = align("我们去公园", "你们去园", "char")
    assert (result.substitutions, result.deletions, result.insertions) == (1, 1, 0)


@pytest.mark.parametrize("reference,hypothesis", [
    ("2024年之前", "二零二四年之前"),
    ("2024年之前", "两千零二十四年之前"),
    ("2024年之前", "二千零二十四年之前"),
    ("电话138", "电话一三八"),
    ("电话138", "电话幺三八"),
    ("电话138", "电话一百三十八"),
    ("他买了3kg苹果", "他买了三千克苹果"),
    ("1月2日到10日", "一月二日到十日"),
    ("房间1101", "房间幺幺零幺"),
])
def test_every_accepted_number_reading_scores_zero(reference, hypothesis):
    assert error_rate(reference, hypothesis, "pinyin") == 0.0
    assert error_rate(reference, hypothesis, "char") == 0.0


def test_wrong_numbers_still_count():
    assert error_rate("电话138", "电话一三九", "char") == pytest.approx(1 / 5)
    assert error_rate("2024年", "二零二五年", "char") == pytest.approx(1 / 5)


def test_many_numbers_use_coordinate_descent_and_stay_exact():
    reference = "1日2日3日4日5日6日7日8日9日10日11日"
    assert error_rate(reference, "幺日二日三日四日五日六日七日八日九日一十日幺幺日") == 0.0
    assert error_rate(reference, "一日二日三日四日五日六日七日八日九日十日十一日", "char") == 0.0
    wrong = align(reference, "一日二日三日四日五日六日七日八日九日十日十二日", "char")
    assert wrong.errors == 1


def test_digits_in_the_hypothesis_are_read_too():
    assert error_rate("二零二四年", "2024年") == 0.0
    assert error_rate("我有两个", "我有2个") == pytest.approx(0.0)


def test_latin_words_are_tokens():
    assert tokenize("hello world你好", "pinyin") == ("hello", "world", "ni2", "hao3")
    assert tokenize("hello world你好", "char") == ("hello", "world", "你", "好")
    assert error_rate("hello world", "hello word") == 0.5


def test_cached_pinyin_equals_pypinyin():
    text = "我们今天去公园玩得很开心然后一起吃了晚饭回家你好老李不对一样一个展览馆里有很多好看的东西"
    assert han_pinyin(text) == lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True, tone_sandhi=True)


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        error_rate("你好", "你好", "word")


def test_english_is_scored_by_wer_after_whisper_normalization():
    import jiwer

    assert error_rate("The cat sat down.", "the cat sat up", language="en") == pytest.approx(0.25)
    assert jiwer.wer("the cat sat down", "the cat sat up") == pytest.approx(0.25)
    # Whisper's normalization makes these the same words; the zh scoring reads 2 as 二
    assert error_rate("Mr. Smith's 2 dogs", "mister smith is two dogs", language="en") == 0.0
    assert error_rate("Mr. Smith's 2 dogs", "mister smith is two dogs", language="zh") > 0.5
    assert align("Mr. Smith's 2 dogs", "mister smith is two dogs", language="en-US").reference == (
        "mister", "smith", "is", "2", "dogs")


def test_japanese_and_korean_are_scored_by_cer():
    import jiwer

    # す -> し substituted and た inserted: 2 errors over 9 characters
    assert error_rate("今日は良い天気です。", "今日は良い天気でした", language="ja") == pytest.approx(2 / 9)
    assert jiwer.cer("今日は良い天気です", "今日は良い天気でした") == pytest.approx(2 / 9)
    assert error_rate("안녕하세요 여러분!", "안녕하세요 여러번", language="ko") == pytest.approx(1 / 8)


def test_no_language_and_zh_keep_the_configured_metric():
    for metric in ("pinyin", "char"):
        for language in (None, "zh", "cmn"):
            assert error_rate("他们来了", "她们来了", metric, language) == (0.0 if metric == "pinyin" else 0.25)


def test_metric_name_and_bad_language():
    from ttsrl.scoring import metric_name

    assert [metric_name("char", x) for x in (None, "zh", "en", "ja", "ko")] == ["char", "char", "wer", "cer", "cer"]
    with pytest.raises(ValueError, match="'xx'"):
        error_rate("a", "a", language="xx")
    with pytest.raises(EmptyReferenceError):
        error_rate("...", "a", language="en")
