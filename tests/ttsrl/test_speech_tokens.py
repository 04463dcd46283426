import pytest

from ttsrl.speech_tokens import (SPEECH_END_TOKENS, SPEECH_VOCAB_SIZE, _parse_any, added_tokens,
                                 format_speech_tokens, parse_speech_tokens, speech_token)


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
