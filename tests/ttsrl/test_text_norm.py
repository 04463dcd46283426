import pytest

from ttsrl.text_norm import cardinal_reading, cardinal_readings, digit_readings, normalize_text, number_readings


@pytest.mark.parametrize("value,reading", [
    (0, "零"), (7, "七"), (10, "十"), (15, "十五"), (20, "二十"), (105, "一百零五"), (1005, "一千零五"),
    (2024, "二千零二十四"), (10050, "一万零五十"), (100000, "十万"), (1000000, "一百万"),
    (100010000, "一亿零一万"), (20010, "二万零一十"),
])
def test_cardinal_reading(value, reading):
    assert cardinal_reading(value) == reading


def test_accepted_number_readings():
    assert set(number_readings("2024")) == {"二千零二十四", "两千零二十四", "二零二四"}
    assert set(number_readings("138")) == {"一百三十八", "一三八", "幺三八"}
    assert "一十五" in number_readings("15") and "十五" in number_readings("15")
    assert number_readings("007") == ["零零七"]  # a code: no cardinal reading
    assert set(number_readings("3.14")) == {"三点一四", "三点幺四"}
    assert digit_readings("10") == ["一零", "幺零"]
    assert cardinal_readings("0123") == []


def test_normalize_text_width_case_punctuation_space():
    assert normalize_text("ＡＢＣ，Hello,  World!") == "abc hello world"
    assert normalize_text("你好， 世界！") == "你好世界"
    assert normalize_text("Don't stop") == "don't stop"
    assert normalize_text("他买了3kg苹果") == "他买了三千克苹果"


ENGLISH_CASES = [
    ("Mr. Smith's 2 dogs", "mister smith is 2 dogs"),
    ("Mr Smith has two dogs", "mister smith has 2 dogs"),
    ("It's twenty-five percent [laughs] (noise) okay, um, yes!", "it is 25% okay yes"),
    ("Dr. Who won't go.", "doctor who will not go"),
    ("I have one hundred and twenty three apples", "i have 123 apples"),
    ("He's 3.5 m tall", "he is 3.5 m tall"),
    ("they're here, we've done, I'd go, you'll see, I'm ok", "they are here we have done i would go you will see i am ok"),
    ("Mrs. Jones and St. Paul", "missus jones and saint paul"),
    ("$20 and 5%", "$20 and 5%"),
    ("one two three", "123"),
    ("ten thousand", "10000"),
    ("nineteen ninety nine", "1999"),
    ("Café au lait", "cafe au lait"),
]


@pytest.mark.parametrize("text,normalized", ENGLISH_CASES)
def test_normalize_english_follows_whisper_rules(text, normalized):
    from ttsrl.text_norm import normalize_english

    assert normalize_english(text) == normalized


def test_normalize_characters_drops_punctuation_and_spaces():
    from ttsrl.text_norm import normalize_characters

    assert normalize_characters("今日は、いい 天気！") == "今日はいい天気"
    assert normalize_characters("안녕하세요, 여러분!") == "안녕하세요여러분"
    assert normalize_characters("ＡＢＣ") == "abc"
