import pytest

from ttsrl.speech_tokens import (SPEECH_END_TOKENS, SPEECH_VOCAB_SIZE, ParsedSpeech, _parse_any, added_tokens,
                                 format_speech_tokens, parse_speech_tokens, speech_end_tokens, speech_token)


@pytest.mark.parametrize("text", [
    "<|s_1|><|s_2|>", "<|s_1|><|s_6560|><|eos1|>", "<|s_1|><|s_6561|>", "<|s_007|>", "<|s_1|> <|s_2|>",
    "<|s_1|><|eos2|><|s_3|>", "hi<|s_1|>", "<|s_1|>hi", "", "<|eos1|>", "<|s_1|><|eos1|><|eos2|>", "<|s_|>",
    " <|s_1|> <|s_2|> <|eos1|> ", "<|s_1|>\n<|s_2|>", "<|s_1|> <|eos1|> <|s_2|>",
])
def test_fast_path_agrees_with_the_general_parser(text):
    assert parse_speech_tokens(text) == _parse_any(text)


def test_round_trip_of_ids():
    ids = [0, 17, 6560, 3]
    assert parse_speech_tokens(format_speech_tokens(ids)).ids == ids


def test_text_and_special_tokens_are_ignored_and_counted():
    parsed = parse_speech_tokens("hello <|s_1|><|im_end|> <|s_2|>world<|s_3|>")
    assert parsed.ids == [1, 2, 3]
    assert parsed.ignored == 3 and not parsed.ended


def test_out_of_range_and_after_end_tokens_are_ignored():
    parsed = parse_speech_tokens(f"<|s_1|><|s_{SPEECH_VOCAB_SIZE}|><|s_2|>{SPEECH_END_TOKENS[0]}<|s_3|> tail")
    assert parsed.ids == [1, 2]
    assert parsed.ended and parsed.ignored == 3


def test_empty_and_whitespace_responses():
    assert parse_speech_tokens("") .ids == [] and parse_speech_tokens(" \n ").ignored == 0


def test_added_tokens_order_and_bounds():
    tokens = added_tokens()
    assert tokens[:2] == ["<|s_0|>", "<|s_1|>"] and tokens[SPEECH_VOCAB_SIZE - 1] == "<|s_6560|>"
    assert tokens[SPEECH_VOCAB_SIZE:] == ["<|eos1|>", "<|eos2|>", "<|eos3|>", "<|sos|>", "<|task_id|>"]
    with pytest.raises(ValueError, match="6561"):
        speech_token(SPEECH_VOCAB_SIZE)


# ------------------------------------------------------------------ CosyVoice3 (family="cosyvoice3")

COSYVOICE3_TEXTS = [
    "<|s_1|><|s_2|>", "<|s_1|><|s_6560|><|eos1|>", "<|s_1|><|s_6565|>", "<|s_1|><|s_6760|><|s_3|>",
    "<|s_1|><|sos|>", "<|s_1|> <|task_id|> ", "<|s_1|><|fill|><|eos1|>", "<|s_1|><|s_6761|>", "<|s_6600|>",
    "hi<|s_1|><|s_6700|>", "<|s_1|><|s_6561|>",
]


@pytest.mark.parametrize("text", COSYVOICE3_TEXTS)
def test_cosyvoice3_fast_path_agrees_with_the_general_parser(text):
    assert parse_speech_tokens(text, "cosyvoice3") == _parse_any(text, "cosyvoice3")


@pytest.mark.parametrize("end", ["<|sos|>", "<|eos1|>", "<|task_id|>", "<|fill|>", "<|s_6565|>", "<|s_6760|>"])
def test_every_cosyvoice3_stop_row_ends_the_speech(end):
    parsed = parse_speech_tokens(f"<|s_4|><|s_5|>{end}<|s_6|>", family="cosyvoice3")
    assert parsed.ids == [4, 5] and parsed.ended and parsed.ignored == 1


def test_cosyvoice2_stop_tokens_are_only_its_own():
    # <|sos|> / <|task_id|> are prompt tokens of CosyVoice2 and <|s_6565|> is no token of it.
    for piece in ("<|sos|>", "<|task_id|>", "<|s_6565|>", "<|fill|>"):
        parsed = parse_speech_tokens(f"<|s_4|>{piece}<|s_5|>")
        assert parsed.ids == [4, 5] and not parsed.ended and parsed.ignored == 1
    assert speech_end_tokens() == SPEECH_END_TOKENS and len(speech_end_tokens("cosyvoice3")) == 200
    # <|s_6561|> is out of range in both families (CosyVoice3 names that row <|sos|>).
    assert parse_speech_tokens("<|s_1|><|s_6561|>", "cosyvoice3") == ParsedSpeech(ids=[1], ignored=1, ended=False)


def test_cosyvoice3_added_tokens():
    tokens = added_tokens("cosyvoice3")
    assert len(tokens) == 6761 and tokens[SPEECH_VOCAB_SIZE - 1] == "<|s_6560|>"
    assert tokens[SPEECH_VOCAB_SIZE:SPEECH_VOCAB_SIZE + 5] == ["<|sos|>", "<|eos1|>", "<|task_id|>", "<|fill|>",
                                                               "<|s_6565|>"]
    with pytest.raises(ValueError, match="known families"):
        added_tokens("cosyvoice1")
