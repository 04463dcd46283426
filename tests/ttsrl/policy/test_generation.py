"""ttsrl.policy.generation: upstream's LLM input of an utterance, and upstream's length bounds."""
import pytest

from tests.policy_utils import tiny_policy  # noqa: F401 - fixture
from ttsrl.eval_sets import EvalUtterance
from ttsrl.frontend import FrontendError, PolicyFrontend
from ttsrl.policy.generation import join_answers, utterance_inputs
from ttsrl.speech_tokens import format_speech_tokens, parse_speech_tokens


def test_an_utterance_reads_upstreams_input(tiny_policy):  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_policy))
    frontend = PolicyFrontend(tokenizer, "cosyvoice2")
    [call] = utterance_inputs(frontend, EvalUtterance("a", "2024年", prompt_text="提示", prompt_tokens=[5, 6]))
    assert tokenizer.decode(list(call.ids)) == "<|sos|>提示二零二四年。<|task_id|><|s_5|><|s_6|>"
    [alone] = utterance_inputs(frontend, EvalUtterance("b", "你好", prompt_text="提示"))  # no tokens: text only
    assert tokenizer.decode(list(alone.ids)) == "<|sos|>你好。<|task_id|>"
    long = "这是一个很长的句子，它有很多很多的字。" * 6
    assert len(utterance_inputs(frontend, EvalUtterance("c", long))) > 1  # upstream's several LLM calls
    with pytest.raises(FrontendError):
        utterance_inputs(frontend, EvalUtterance("d", "。。。"))


def test_the_answers_of_several_calls_are_one_answer():
    first, second = format_speech_tokens([1, 2]) + "<|eos1|>", format_speech_tokens([3]) + "<|eos1|>"
    joined = parse_speech_tokens(join_answers([first, second], "cosyvoice2"))
    assert (joined.ids, joined.ended) == ([1, 2, 3], True)
    assert join_answers([first], "cosyvoice2") == first


def test_transformers_generation_keeps_each_calls_bounds(tiny_policy):  # noqa: F811
    """Each call stops no earlier than its min and no later than its max (upstream's bounds), in one batch."""
    from ttsrl.policy.generation import TransformersGenerator
    from ttsrl.sampling import SamplingOptions

    generator = TransformersGenerator(str(tiny_policy), "cpu", SamplingOptions(max_new_tokens=40, greedy=True,
                                                                               min_token_text_ratio=3,
                                                                               max_token_text_ratio=5))
    calls = [generator.frontend.build("一。"), generator.frontend.build("一二三四五六。")]
    answers = [parse_speech_tokens(a, generator.family) for a in generator.generate_inputs(calls)]
    for call, answer in zip(calls, answers):
        length = len(answer.ids) + answer.ignored
        assert call.min_tokens <= length <= call.max_tokens == 5 * call.text_tokens
    assert len(answers[0].ids) + answers[0].ignored < calls[1].min_tokens  # the short call was not held to the long one's


import pytest  # noqa: E402  (this section's own import: the file is appended to by section)


class TestVllmPlacement:
    """--backend vllm under torchrun: each rank's engine on its own GPU, with a memory share that
    leaves the reward server room on the GPUs it uses (pure functions: vLLM needs CUDA)."""

    def test_each_local_rank_gets_its_own_visible_gpu(self):
        from ttsrl.policy.generation import vllm_placement

        visible = ["4", "5", "6", "7"]
        placed = [vllm_placement(rank=8 + r, local_rank=r, visible=visible, server_devices=frozenset({0}),
                                 local_world_size=4) for r in range(4)]
        assert [gpu for gpu, _ in placed] == visible  # N ranks, N different GPUs, in torchrun's order
        assert [share for _, share in placed] == [0.5, 0.85, 0.85, 0.85]  # the server shares visible GPU 0

    def test_shares_follow_the_flags_and_the_server_devices(self):
        from ttsrl.policy.generation import parse_server_devices, vllm_placement

        assert parse_server_devices("cpu") == frozenset() and parse_server_devices("none") == frozenset()
        assert parse_server_devices("0, 2") == {0, 2} and parse_server_devices("cuda:1") == {1}
        assert vllm_placement(1, 1, ["a", "b"], parse_server_devices("cpu"), 2, own_share=0.9) == ("b", 0.9)
        assert vllm_placement(1, 1, ["a", "b"], {0, 1}, 2, shared_share=0.3) == ("b", 0.3)

    @pytest.mark.parametrize("local_rank, local_world_size", [(2, 3), (0, 3)])
    def test_more_ranks_than_gpus_is_refused_on_every_rank(self, local_rank, local_world_size):
        from ttsrl.policy.generation import PlacementError, vllm_placement

        with pytest.raises(PlacementError, match=r"only 2 GPU\(s\) are visible \(0,1\).*--nproc_per_node=2"):
            vllm_placement(local_rank, local_rank, ["0", "1"], frozenset({0}), local_world_size)

    @pytest.mark.parametrize("local_rank, local_world_size", [(0, 2), (1, 2), (0, 3), (2, 3)])
    def test_every_torchrun_rank_refuses_by_itself(self, local_rank, local_world_size):
        """rank_placement, infer_dist's check, on the environment torchrun gives each rank: each
        rank of too many refuses on its own, so no rank depends on another's failure to stop."""
        from ttsrl.policy.generation import PlacementError, rank_placement

        environ = {"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world_size),
                   "CUDA_VISIBLE_DEVICES": "0"}
        with pytest.raises(PlacementError, match=rf"^rank {local_rank} \(local rank {local_rank} of "
                                                 rf"{local_world_size} on this node\).*only 1 GPU\(s\) are visible "
                                                 r"\(0\); run torchrun --nproc_per_node=1"):
            rank_placement(environ)

    def test_bad_input_is_refused_with_the_flag(self):
        from ttsrl.policy.generation import PlacementError, parse_server_devices, vllm_placement

        with pytest.raises(PlacementError, match="--server-devices 'gpu0'"):
            parse_server_devices("gpu0")
        with pytest.raises(PlacementError, match=r"--gpu-memory-utilization 1.5: must be in \(0, 1\]"):
            vllm_placement(0, 0, ["0"], own_share=1.5)
        with pytest.raises(PlacementError, match="needs a GPU, but none is visible"):
            vllm_placement(0, 0, [])

    def test_the_engine_is_pinned_and_gets_its_share_and_seed(self):
        from ttsrl.policy.generation import place_vllm_engine, vllm_engine_kwargs
        from ttsrl.sampling import SamplingOptions

        environ = {"RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}
        rank, share = place_vllm_engine(environ, server_devices="1")
        assert environ["CUDA_VISIBLE_DEVICES"] == "GPU-bb" and (rank, share) == (3, 0.5)
        kwargs = vllm_engine_kwargs("/m", SamplingOptions(seed=7), rank, share)
        assert kwargs == {"model": "/m", "seed": 10, "gpu_memory_utilization": 0.5}  # rank r samples with seed + r

    def test_gpus_come_from_torch_when_cuda_visible_devices_is_unset(self):
        from ttsrl.policy.generation import PlacementError, place_vllm_engine, visible_gpus

        assert visible_gpus({}, device_count=3) == ["0", "1", "2"]
        assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
        with pytest.raises(PlacementError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
            place_vllm_engine({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "CUDA_VISIBLE_DEVICES": "0"})


class TestZeroShotPromptAgainstPinnedCosyVoice2:
    """The zero-shot prompt of stage 0 and infer_dist.py (``zero_shot_messages`` through the
    converted model's chat template) against the pinned CosyVoice2 code: the HF model fed it
    gives the next-token logits that ``Qwen2LM.inference`` computes for the same prompt, with
    the text tokens made as CosyVoice2's frontend makes them (prompt text and text each
    tokenized by its ``CosyVoice2Tokenizer``, then joined by ``inference``)."""

    TEXT = "今天天气很好[breath]，我们去公园吧。"
    PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
    PROMPT_TOKENS = [12, 6000, 3, 4095, 6560, 77, 1]

    @staticmethod
    def _pinned(monkeypatch):
        """Qwen2LM, Qwen2Encoder and CosyVoice2Tokenizer from the pinned source. The trainer
        environment has no onnxruntime, torchaudio or whisper; the modules that import them
        at the top (online speech-token extraction, wav loading, Whisper's tokenizer) are
        stood in for, as none of them is used by the LLM or the CosyVoice2 tokenizer."""
        import sys
        import types
        from pathlib import Path

        from ttsrl.cosyvoice_source import find_cosyvoice_source

        source = find_cosyvoice_source()
        monkeypatch.syspath_prepend(str(source))
        onnx = types.ModuleType("cosyvoice.utils.onnx")
        onnx.SpeechTokenExtractor, onnx.online_feature, onnx.onnx_path = None, False, None
        whisper_tokenizer = types.ModuleType("whisper.tokenizer")
        whisper_tokenizer.Tokenizer = object
        for name, module in (("cosyvoice.utils.onnx", onnx), ("torchaudio", types.ModuleType("torchaudio")),
                             ("whisper", types.ModuleType("whisper")), ("whisper.tokenizer", whisper_tokenizer)):
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, module)
        from cosyvoice.llm.llm import Qwen2Encoder, Qwen2LM
        from cosyvoice.tokenizer.tokenizer import CosyVoice2Tokenizer

        assert Path(sys.modules["cosyvoice.llm.llm"].__file__).is_relative_to(source)
        return Qwen2LM, Qwen2Encoder, CosyVoice2Tokenizer

    def test_hf_logits_on_our_prompt_match_qwen2lm_inference(self, biased, tmp_path, monkeypatch):
        import json
        import shutil

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ttsrl.chat_template import zero_shot_messages
        from ttsrl.policy.hf_conversion import BLANK_EN, SPEECH_ROWS
        from ttsrl.speech_tokens import SOS_TOKEN, SPEECH_VOCAB_SIZE, TASK_ID_TOKEN
        from ttsrl.tiny_models.cosyvoice2 import write_qwen2_weights

        source, hf_dir = biased
        Qwen2LM, Qwen2Encoder, CosyVoice2Tokenizer = self._pinned(monkeypatch)
        state = torch.load(source / "llm.pt", weights_only=True)
        blank = tmp_path / BLANK_EN
        shutil.copytree(source / BLANK_EN, blank)
        write_qwen2_weights(state, blank)  # Qwen2Encoder loads the backbone with from_pretrained
        hidden = json.loads((blank / "config.json").read_text())["hidden_size"]
        llm = Qwen2LM(llm_input_size=hidden, llm_output_size=hidden, speech_token_size=SPEECH_VOCAB_SIZE,
                      llm=Qwen2Encoder(str(blank)), sampling=None)
        llm.load_state_dict(state, strict=True)
        llm.eval()

        # CosyVoice2's side: frontend_zero_shot's inputs, then inference's first step.
        frontend = CosyVoice2Tokenizer(str(blank))
        text_ids, prompt_text_ids = frontend.encode(self.TEXT), frontend.encode(self.PROMPT_TEXT)
        logits = []
        llm.llm_decoder.register_forward_hook(lambda module, args, out: logits.append(out[0].detach().clone()))
        llm.sampling_ids = lambda *args, **kwargs: llm.eos_token  # one step is all we compare: stop there
        emitted = list(llm.inference(
            text=torch.tensor([text_ids], dtype=torch.int32), text_len=torch.tensor([len(text_ids)], dtype=torch.int32),
            prompt_text=torch.tensor([prompt_text_ids], dtype=torch.int32),
            prompt_text_len=torch.tensor([len(prompt_text_ids)], dtype=torch.int32),
            prompt_speech_token=torch.tensor([self.PROMPT_TOKENS], dtype=torch.int32),
            prompt_speech_token_len=torch.tensor([len(self.PROMPT_TOKENS)], dtype=torch.int32),
            embedding=torch.zeros(1, 192)))
        assert emitted == [] and len(logits) == 1
        expected = logits[0]  # llm_decoder output for the next token: (6564,)

        # Ours: the messages stage 0 writes, through the converted model's chat template.
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        prompt = tokenizer.apply_chat_template(zero_shot_messages(self.TEXT, self.PROMPT_TEXT, self.PROMPT_TOKENS),
                                               tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        offset = tokenizer.convert_tokens_to_ids("<|s_0|>")
        sos, task = tokenizer.convert_tokens_to_ids([SOS_TOKEN, TASK_ID_TOKEN])
        assert ids == [sos] + prompt_text_ids + text_ids + [task] + [offset + t for t in self.PROMPT_TOKENS]
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids])).logits[0, -1]
        # Equal up to llm_decoder's bias, which the converted model does not carry (by decision,
        # see test_hf_conversion.py); every non-speech logit is 0.
        torch.testing.assert_close(ours[offset:offset + SPEECH_ROWS] + state["llm_decoder.bias"], expected,
                                   atol=1e-4, rtol=1e-4)
        assert torch.count_nonzero(ours[:offset]) == 0
        # The check can fail: the text-only prompt gives other logits.
        text_only = tokenizer(tokenizer.apply_chat_template(zero_shot_messages(self.TEXT), tokenize=False),
                              add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            other = model(input_ids=torch.tensor([text_only])).logits[0, -1]
        assert not torch.allclose(other[offset:offset + SPEECH_ROWS] + state["llm_decoder.bias"], expected, atol=1e-2)
