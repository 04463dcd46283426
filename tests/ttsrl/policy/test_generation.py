"""ttsrl.policy.generation: the chat prompt of an utterance."""
from ttsrl.eval_sets import EvalUtterance
from ttsrl.policy.generation import build_messages


def test_zero_shot_messages_put_prompt_speech_in_the_answer():
    utt = EvalUtterance("a", "你好", prompt_text="提示", prompt_tokens=[5, 6])
    assert build_messages(utt) == [{"role": "user", "content": "提示你好"},
                                   {"role": "assistant", "content": "<|s_5|><|s_6|>"}]
    assert build_messages(EvalUtterance("b", "你好"))[1]["content"] == ""
