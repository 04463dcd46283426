"""ttsrl.frontend in either environment: the vocabulary it is checked on, the normalizer choice,
prompt-token trimming, the length bounds and the refusals. (Equality with upstream's own code
over a corpus: tests/server/test_frontend_peer.py.)"""
from __future__ import annotations

import json
import sys
import types

import pytest

from tests.qwen_vocab import KNOWN_IDS, blank_en_dir, policy_tokenizer, vocabulary_facts
from ttsrl import frontend as fe
from ttsrl.model_family import COSYVOICE3_SYSTEM_PREFIX


@pytest.fixture(scope="module")
def tokenizers():
    return {family: policy_tokenizer(family) for family in ("cosyvoice2", "cosyvoice3")}


def test_the_test_vocabulary_is_the_one_cosyvoice_extends(tokenizers):
    from transformers import AutoTokenizer

    facts = vocabulary_facts(AutoTokenizer.from_pretrained(str(blank_en_dir())))
    assert facts["bpe_ranks"] == 151643
    assert facts["special_ids"] == [151643, 151644, 151645]
    assert facts["known_ids"] == KNOWN_IDS
    # the first token CosyVoice's tokenizer adds is the id upstream's CosyVoice3LM hard-codes
    for tokenizer in tokenizers.values():
        assert tokenizer.convert_tokens_to_ids("<|endofprompt|>") == 151646


def test_prompt_and_text_are_tokenized_apart(tokenizers):
    frontend = fe.PolicyFrontend(tokenizers["cosyvoice2"], "cosyvoice2", normalizer=fe.TextNormalizer("wetext"))
    [policy_input] = frontend.inputs("lo there", "I say hel", [7, 8])
    prompt_ids, text_ids = frontend.text_ids("I say hel"), frontend.text_ids("lo there.")
    assert list(policy_input.ids) == ([frontend.sos_id] + prompt_ids + text_ids + [frontend.task_id]
                                      + [frontend.speech_offset + 7, frontend.speech_offset + 8])
    # one string tokenized once merges across the join: that is what this frontend avoids
    assert frontend.text_ids("I say hello there.") != prompt_ids + text_ids
    assert (policy_input.text_tokens, policy_input.min_tokens, policy_input.max_tokens) == (
        len(text_ids), 2 * len(text_ids), 20 * len(text_ids))


def test_text_is_normalized_and_cosyvoice3_prompt_carries_its_prefix(tokenizers):
    normalizer = fe.TextNormalizer("wetext")
    cv2 = fe.PolicyFrontend(tokenizers["cosyvoice2"], "cosyvoice2", normalizer=normalizer)
    cv3 = fe.PolicyFrontend(tokenizers["cosyvoice3"], "cosyvoice3", normalizer=normalizer)
    [two] = cv2.inputs("2024年3月15日", "价格是12元", [1])
    assert two.text == "二零二四年三月十五日。" and two.prompt_text == "价格是十二元"
    [three] = cv3.inputs("2024年3月15日", "价格是12元", [1])
    # upstream does not normalize a prompt text that holds a special token (the system prefix)
    assert three.text == "二零二四年三月十五日。" and three.prompt_text == COSYVOICE3_SYSTEM_PREFIX + "价格是12元"
    [alone] = cv3.inputs("2024年")
    assert alone.prompt_text == COSYVOICE3_SYSTEM_PREFIX and 151646 in alone.ids
    [plain] = cv2.inputs("2024年", "a transcript without speech tokens is dropped")
    assert plain.prompt_text == "" and list(plain.ids[1:-1]) == cv2.text_ids("二零二四年。")


def test_length_ratios_are_settable(tokenizers):
    frontend = fe.PolicyFrontend(tokenizers["cosyvoice2"], "cosyvoice2", normalizer=fe.TextNormalizer("wetext"),
                                 min_ratio=0, max_ratio=3.5)
    [policy_input] = frontend.inputs("你好世界")
    assert policy_input.min_tokens == 0 and policy_input.max_tokens == int(policy_input.text_tokens * 3.5)
    assert policy_input.max_new_tokens(2) == 2 and policy_input.min_new_tokens(2) == 0
    with pytest.raises(ValueError, match="ratios"):
        fe.PolicyFrontend(tokenizers["cosyvoice2"], "cosyvoice2", min_ratio=5, max_ratio=2)


def test_text_that_normalizes_to_nothing_is_refused(tokenizers):
    frontend = fe.PolicyFrontend(tokenizers["cosyvoice2"], "cosyvoice2", normalizer=fe.TextNormalizer("wetext"))
    for text in ("。。。", "……！", "——"):
        with pytest.raises(fe.FrontendError, match="nothing to say|fails on"):
            frontend.inputs(text)


def test_long_english_needs_the_tokenizer_to_split():
    normalizer = fe.TextNormalizer("wetext")
    assert normalizer.normalize("A short one") == ["A short one."]
    long = "word " * 30
    with pytest.raises(fe.NeedsTokenizerError, match="tokenizer"):
        normalizer.normalize(long)
    # Chinese is measured in characters: no tokenizer needed
    assert len(normalizer.normalize("你好。" * 40)) > 1


def test_prompt_token_trimming_follows_the_24khz_mel_frames():
    # 3.48 s at 24 kHz: 83520 samples -> 174 frames -> 87 tokens
    assert fe.prompt_token_limit(83520, 24000) == 87
    # 16 kHz is resampled to 24 kHz first (ceil): 16001 samples -> 24002 -> 50 frames -> 25 tokens
    assert fe.resampled_length(16001, 16000) == 24002
    assert fe.prompt_token_limit(16001, 16000) == 25
    assert fe.resampled_length(24000, 24000) == 24000 and fe.resampled_length(44101, 44100) == 24001
    assert fe.trim_prompt_tokens(list(range(100)), 83520, 24000) == list(range(87))
    assert fe.trim_prompt_tokens([1, 2], 83520, 24000) == [1, 2]


def test_the_normalizer_is_picked_as_upstream_picks_it(monkeypatch, tmp_path):
    """ttsfrd (not installable here: its wheel comes with CosyVoice's pretrained resources) is
    used when it imports and initializes, else wetext; this checks the choice and how its
    sentences are used with a stand-in module of ttsfrd's interface."""
    calls = []

    class Engine:
        def initialize(self, resource):
            calls.append(resource)
            return resource.endswith("good")

        def set_lang_type(self, kind):
            calls.append(kind)

        def do_voicegen_frd(self, text):
            return json.dumps({"sentences": [{"text": "第一句。"}, {"text": "！"}, {"text": "第二句。"}]})

    monkeypatch.setitem(sys.modules, "ttsfrd", types.SimpleNamespace(TtsFrontendEngine=Engine))
    assert fe.TextNormalizer(ttsfrd_resource=tmp_path / "bad").kind == "wetext"
    picked = fe.TextNormalizer(ttsfrd_resource=tmp_path / "good")
    assert picked.kind == "ttsfrd" and calls[-1] == "pinyinvg"
    assert picked.normalize("whatever") == ["第一句。", "第二句。"]
    assert picked.normalize("whatever", split=False) == "第一句。！第二句。"
    monkeypatch.delitem(sys.modules, "ttsfrd")
    assert fe.TextNormalizer().kind == "wetext"
    with pytest.raises(RuntimeError, match="ttsfrd"):
        fe.TextNormalizer("ttsfrd")


def test_special_token_text_is_not_normalized():
    normalizer = fe.TextNormalizer("wetext")
    assert normalizer.normalize("<|endofprompt|>2024年") == ["<|endofprompt|>2024年"]
    assert normalizer.normalize("", split=False) == ""
