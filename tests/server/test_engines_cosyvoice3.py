"""The CosyVoice3 engines (token2wav_server.engines_cosyvoice3) on the real pinned CosyVoice code
with tiny random weights (ttsrl.tiny_models.cosyvoice3_audio): the tiny directory's layout,
synthesis lengths with per-item prompts, equality with upstream CosyVoice3Model.token2wav,
batched DiT decoding against item by item, the v3 speech tokenizer, clear errors for bad
tokens and model directories, and a token2wav_asr batch through the real PyTriton server."""
import os
import shutil

import numpy as np
import pytest
import torch

from token2wav_server import engines_cosyvoice3
from token2wav_server.engines import EngineOptions, SpeakerPrompt
from token2wav_server.engines_cosyvoice2 import CampplusSpeaker, CosyVoice2SpeechTokenizer
from token2wav_server.engines_cosyvoice3 import CosyVoice3Token2Wav, check_cosyvoice3_dir
from token2wav_server.prompt_bank import load_prompts
from tests.server.flow_utils import assert_batched_flow_matches_serial

SAMPLES_PER_TOKEN = 2 * 480  # CosyVoice3: 2 mel frames per speech token, HiFT hop 480 at 24 kHz
ENGINES = "token2wav_server.engines_cosyvoice3:create_engines"


@pytest.fixture(scope="session")
def cosyvoice3_models(cosyvoice_src, tmp_path_factory):
    """The tiny CosyVoice3 audio directory and a tiny SenseVoiceSmall, built once."""
    from ttsrl.tiny_models.asr import write_tiny_sensevoice
    from ttsrl.tiny_models.cosyvoice3_audio import write_cosyvoice3_audio

    root = tmp_path_factory.mktemp("cosyvoice3_models")
    return {"cosyvoice3": write_cosyvoice3_audio(root / "Fun-CosyVoice3-0.5B", seed=0, cosyvoice_src=cosyvoice_src),
            "sensevoice": write_tiny_sensevoice(root / "SenseVoiceSmall", seed=0),
            "prompt_wav": cosyvoice_src / "asset" / "zero_shot_prompt.wav"}


@pytest.fixture(scope="module")
def token2wav(cosyvoice3_models):
    return CosyVoice3Token2Wav(str(cosyvoice3_models["cosyvoice3"]), "cpu")


@pytest.fixture(scope="module")
def prompts(token2wav, cosyvoice3_models):
    """Two different prepared prompts: the real zero-shot wav and its first 2 seconds."""
    (full,) = load_prompts(str(cosyvoice3_models["prompt_wav"]))
    short = SpeakerPrompt("short", full.wave[:16000 * 2], 16000, "希望你以后")
    return [token2wav.prepare_prompt(full), token2wav.prepare_prompt(short)]


def _tokens(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 6561, n) for n in lengths]


def test_the_full_tiny_directory_adds_the_llm_side_stage_minus_1_converts(cosyvoice_src, tmp_path):
    """write_full_cosyvoice3 (stage -1 with model_source=tiny and the real CosyVoice3 engines, e.g. the
    rehearsal): the token2wav files the engines check and a CosyVoice3 llm.pt with its tokenizer folder."""
    import torch

    from ttsrl.model_family import family_of_llm_state_dict
    from ttsrl.tiny_models.cosyvoice3_audio import write_full_cosyvoice3

    directory = write_full_cosyvoice3(tmp_path / "Fun-CosyVoice3-0.5B-2512", seed=0, cosyvoice_src=cosyvoice_src)
    check_cosyvoice3_dir(str(directory))
    assert {"llm.pt", "CosyVoice-BlankEN"} <= {p.name for p in directory.iterdir()}
    state = torch.load(directory / "llm.pt", map_location="cpu", weights_only=True)
    assert family_of_llm_state_dict(state).name == "cosyvoice3"
    assert [p.name for p in tmp_path.iterdir()] == ["Fun-CosyVoice3-0.5B-2512"]  # no staging folder left


def test_tiny_directory_has_the_real_layout(cosyvoice3_models):
    import onnxruntime

    directory = check_cosyvoice3_dir(str(cosyvoice3_models["cosyvoice3"]))
    assert sorted(p.name for p in directory.iterdir()) == sorted(engines_cosyvoice3.REQUIRED_FILES)
    yaml_text = (directory / "cosyvoice3.yaml").read_text()
    for cls in ("cosyvoice.flow.flow.CausalMaskedDiffWithDiT", "cosyvoice.flow.DiT.dit.DiT",
                "cosyvoice.hifigan.generator.CausalHiFTGenerator",
                "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer"):
        assert f"!new:{cls}" in yaml_text
    assert "llm:" not in yaml_text and "cosyvoice.dataset" not in yaml_text  # token2wav blocks only
    assert "depth: 2" in yaml_text and "fmax: null" in yaml_text  # reduced DiT; CosyVoice3's own mel extractor
    tokenizer = onnxruntime.InferenceSession(str(directory / "speech_tokenizer_v3.onnx"),
                                             providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in tokenizer.get_inputs()] == [
        ("feats", [1, 128, "T"], "tensor(float)"), ("feats_length", [1], "tensor(int32)")]


def test_prompt_features(prompts):
    for prepared in prompts:
        tokens, feat, embedding = (prepared[k] for k in ("flow_prompt_speech_token", "prompt_speech_feat",
                                                         "flow_embedding"))
        assert tokens.dtype == torch.int32 and feat.shape == (1, 2 * tokens.shape[1], 80)
        assert embedding.shape == (1, 192) and int(tokens.min()) >= 0 and int(tokens.max()) < 6561
    assert prompts[1]["flow_prompt_speech_token"].shape[1] == 50  # 2 s at 25 tokens per second
    assert prompts[0]["flow_prompt_speech_token"].shape[1] == 87  # the 3.48 s zero-shot wav


def test_synthesis_lengths_with_different_tokens_and_per_item_prompts(token2wav, prompts):
    batch = _tokens(0, (12, 30, 1, 12))
    batch[3] = batch[0]  # same tokens as item 0, other prompt
    item_prompts = [prompts[0], prompts[1], prompts[0], prompts[1]]
    waves = token2wav.synthesize(batch, item_prompts)
    assert token2wav.sample_rate == 24000
    assert [w.shape for w in waves] == [(SAMPLES_PER_TOKEN * len(t),) for t in batch]
    assert all(w.dtype == np.float32 and np.isfinite(w).all() and np.abs(w).max() <= 1.0 for w in waves)
    mels = token2wav.mels([batch[0], batch[3]], [prompts[0], prompts[1]])
    assert (mels[0] - mels[1]).abs().max() > 0.1  # each item is conditioned on its own prompt


def test_one_by_one_equals_upstream_cosyvoice3_model_token2wav(token2wav, prompts):
    """What the engine decodes is what CosyVoice3Model.token2wav (the non-streaming path of
    CosyVoice3Model.tts) gives for the same prompt inputs; HiFT's noise source is seeded alike."""
    from cosyvoice.cli.model import CosyVoice3Model

    upstream = CosyVoice3Model(None, token2wav.flow, token2wav.hift, fp16=False)
    upstream.device = torch.device("cpu")
    tokens = _tokens(3, (17,))[0]
    prompt = prompts[1]
    torch.manual_seed(0)
    ours = token2wav.synthesize([tokens], [prompt])[0]
    upstream.hift_cache_dict["u"] = None
    torch.manual_seed(0)
    with torch.inference_mode():
        theirs = upstream.token2wav(torch.as_tensor(tokens, dtype=torch.int32).reshape(1, -1),
                                    prompt["flow_prompt_speech_token"], prompt["prompt_speech_feat"],
                                    prompt["flow_embedding"], token_offset=0, uuid="u", stream=False, finalize=True)
    np.testing.assert_allclose(ours, theirs.reshape(-1).numpy(), rtol=0, atol=1e-6)
    assert np.abs(ours).max() > 1e-3


def test_fp16_runs_the_flow_and_hift_under_autocast_as_upstream(token2wav, prompts):
    """--fp16 (the default on CUDA) on the CPU, changing only what a CPU forces (the autocast's
    device type): what the engine decodes equals upstream CosyVoice3Model.token2wav under the
    same float16 autocast, flow and HiFT both inside it, and differs from fp32 by fp16 rounding."""
    from cosyvoice.cli.model import CosyVoice3Model

    upstream = CosyVoice3Model(None, token2wav.flow, token2wav.hift, fp16=False)  # its own autocast is CUDA's
    upstream.device = torch.device("cpu")
    tokens, prompt = _tokens(6, (21,))[0], prompts[0]
    torch.manual_seed(0)
    full = token2wav.synthesize([tokens], [prompt])[0]
    batch = _tokens(7, (12, 25))
    serial = token2wav.mels(batch, [prompt] * 2)
    token2wav.fp16 = True  # the same engine with --fp16
    try:
        torch.manual_seed(0)
        ours = token2wav.synthesize([tokens], [prompt])[0]
        token2wav.flow_batch = True
        batched = token2wav.mels(batch, [prompt] * 2)
    finally:
        token2wav.fp16 = token2wav.flow_batch = False
    upstream.hift_cache_dict["u"] = None
    torch.manual_seed(0)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        theirs = upstream.token2wav(torch.as_tensor(tokens, dtype=torch.int32).reshape(1, -1),
                                    prompt["flow_prompt_speech_token"], prompt["prompt_speech_feat"],
                                    prompt["flow_embedding"], token_offset=0, uuid="u", stream=False, finalize=True)
    np.testing.assert_allclose(ours, theirs.float().reshape(-1).numpy(), rtol=0, atol=1e-3)
    assert np.isfinite(ours).all() and 0 < np.abs(ours - full).max()
    for one, many in zip(serial, batched):
        torch.testing.assert_close(many, one, rtol=0, atol=0.05 * float(one.abs().max()))


def test_tensorrt_goes_through_upstreams_load_trt(token2wav, cosyvoice3_models):
    """--load-trt hands the engine's own DiT flow to upstream's CosyVoice3Model.load_trt (plan and ONNX
    names as upstream builds them); on the CPU that is as far as it goes: upstream's own CUDA check."""
    estimator = token2wav.flow.decoder.estimator
    with pytest.raises(AssertionError, match="tensorrt only supports gpu"):
        engines_cosyvoice3.load_trt_estimator(token2wav.flow, token2wav.hift, cosyvoice3_models["cosyvoice3"],
                                              torch.device("cpu"), fp16=True)
    assert token2wav.flow.decoder.estimator is estimator  # nothing replaced


def test_batched_dit_decoding_matches_item_by_item(token2wav, prompts):
    """The DiT run once per Euler step for a padded batch gives the mel flow.inference gives
    per item. Measured difference: under 1e-6 on mels of magnitude ~4 (float32 rounding).
    Tolerance 1e-4: far above rounding, far below what a padding leak into the real frames
    (wrong mask, noise or prompt offset) would change."""
    batch = _tokens(1, (20, 7, 33))
    assert_batched_flow_matches_serial(token2wav, batch, [prompts[0], prompts[1], prompts[0]])


def test_the_recipes_full_yaml_builds_only_token2wav(token2wav, cosyvoice3_models, cosyvoice_src, tmp_path, prompts):
    """A cosyvoice3.yaml with every block of the recipe (LLM, text tokenizer, training pipeline,
    GAN) loads without them: no Qwen2 checkpoint and no pyarrow needed, same outputs."""
    from ttsrl.tiny_models.cosyvoice3_audio import cosyvoice3_yaml

    full = tmp_path / "full"
    shutil.copytree(cosyvoice3_models["cosyvoice3"], full)
    text = cosyvoice3_yaml(cosyvoice_src, size="tiny", seed=0, inference_only=False)
    assert "!new:cosyvoice.llm.llm.CosyVoice3LM" in text and "cosyvoice.dataset.processor" in text
    (full / "cosyvoice3.yaml").write_text(text, encoding="utf-8")
    engine = CosyVoice3Token2Wav(str(full), "cpu")
    tokens = _tokens(4, (9,))
    torch.testing.assert_close(engine.mels(tokens, prompts[:1])[0], token2wav.mels(tokens, prompts[:1])[0],
                               rtol=0, atol=0)


def test_speaker_and_v3_speech_tokenizer(token2wav):
    speaker, tokenizer = CampplusSpeaker(token2wav), CosyVoice2SpeechTokenizer(token2wav)
    noise = np.random.default_rng(2).normal(0, 0.1, 16000).astype(np.float32)
    tone = (0.3 * np.sin(np.arange(8000) * 0.05)).astype(np.float32)
    embeddings = speaker.embed([noise, tone])
    assert embeddings.shape == (2, 192) and not np.allclose(embeddings[0], embeddings[1])
    tokens = tokenizer.tokenize([noise, tone])
    assert [t.shape for t in tokens] == [(25,), (13,)]  # 25 per second, rounded up
    assert all(t.dtype == np.int64 and t.min() >= 0 and t.max() < 6561 for t in tokens)
    assert len(set(tokens[0].tolist())) > 5  # not a constant


def test_bad_tokens_name_the_item(token2wav, prompts):
    good = np.arange(5)
    with pytest.raises(ValueError, match=r"item 1: speech token id 6561 at position 2 is outside \[0, 6561\)"):
        token2wav.synthesize([good, np.array([0, 1, 6561])], [prompts[0]] * 2)
    with pytest.raises(ValueError, match=r"item 0: speech token id -1 at position 0"):
        token2wav.synthesize([np.array([-1])], [prompts[0]])
    with pytest.raises(ValueError, match=r"item 1: expected a non-empty 1-D array"):
        token2wav.synthesize([good, np.array([], dtype=np.int64)], [prompts[0]] * 2)


def test_missing_model_files_are_named(cosyvoice3_models, tmp_path):
    broken = tmp_path / "cv3"
    shutil.copytree(cosyvoice3_models["cosyvoice3"], broken)
    (broken / "speech_tokenizer_v3.onnx").unlink()
    (broken / "flow.pt").unlink()
    with pytest.raises(FileNotFoundError) as caught:
        CosyVoice3Token2Wav(str(broken), "cpu")
    message = str(caught.value)
    assert "speech_tokenizer_v3.onnx (the CosyVoice3 speech tokenizer)" in message
    assert "flow.pt (the DiT flow-matching decoder weights)" in message and "hift.pt" not in message
    assert "Fun-CosyVoice3-0.5B" in message
    with pytest.raises(FileNotFoundError, match=r"--engine-option cosyvoice3_dir .*nope: not a directory"):
        check_cosyvoice3_dir(str(tmp_path / "nope"))
    (broken / "cosyvoice3.yaml").write_text("sample_rate: 24000\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cosyvoice3.yaml: no top-level flow, hift, feat_extractor object"):
        engines_cosyvoice3.token2wav_configs(broken / "cosyvoice3.yaml")


def test_a_missing_dit_dependency_is_explained(cosyvoice3_models, monkeypatch):
    import sys

    # As if x-transformers were not installed (the DiT imports it when the yaml is built).
    for name in ("x_transformers", "x_transformers.x_transformers"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "cosyvoice.flow.DiT.dit", raising=False)
    monkeypatch.delattr(sys.modules["cosyvoice.flow.DiT"], "dit", raising=False)  # built by the fixture
    with pytest.raises(ImportError, match=r"cosyvoice3.yaml: cannot build its flow/HiFT .*x_transformers.*"
                                          r"CosyVoice3's DiT needs x-transformers"):
        CosyVoice3Token2Wav(str(cosyvoice3_models["cosyvoice3"]), "cpu")


def test_factory_options(cosyvoice3_models):
    sensevoice = str(cosyvoice3_models["sensevoice"])
    with pytest.raises(FileNotFoundError, match=r"CosyVoice3 token2wav engine needs --engine-option cosyvoice3_dir"):
        engines_cosyvoice3.create_engines(EngineOptions(sensevoice_dir=sensevoice))
    model_dir = {"cosyvoice3_dir": str(cosyvoice3_models["cosyvoice3"])}
    with pytest.raises(ValueError, match="--load-jit: CosyVoice3 has no JIT-exported flow encoder"):
        engines_cosyvoice3.create_engines(EngineOptions(sensevoice_dir=sensevoice, load_jit=True, extra=model_dir))
    # TensorRT goes through upstream's export: without the estimator's ONNX the error says how to make it
    with pytest.raises(FileNotFoundError, match=r"flow.decoder.estimator.fp32.onnx \(the DiT estimator's ONNX that "
                                                r"--load-trt builds its TensorRT plan from: python "
                                                r"CosyVoice/cosyvoice/bin/export_onnx.py --model_dir "):
        engines_cosyvoice3.create_engines(EngineOptions(sensevoice_dir=sensevoice, load_trt=True, extra=model_dir))
    with pytest.raises(ValueError, match=r"TensorRT estimator \(--load-trt\) takes one classifier-free-guidance"):
        CosyVoice3Token2Wav(model_dir["cosyvoice3_dir"], "cpu", flow_batch=True, load_trt=True)
    assert engines_cosyvoice3.trt_plan_name(True) == "flow.decoder.estimator.fp16.mygpu.plan"  # upstream's names
    assert engines_cosyvoice3.trt_plan_name(False) == "flow.decoder.estimator.fp32.mygpu.plan"
    with pytest.raises(ValueError, match="--engine-option flow_batch='maybe': expected true or false"):
        engines_cosyvoice3.create_engines(EngineOptions(sensevoice_dir=sensevoice,
                                                        extra={**model_dir, "flow_batch": "maybe"}))


@pytest.mark.slow
def test_token2wav_asr_batch_through_the_real_server(cosyvoice3_models, cosyvoice_src, tmp_path):
    """The server CLI takes the CosyVoice3 factory unchanged: rewards for a batch of three."""
    from token2wav_server.launch import start_server
    from ttsrl.triton_client import TritonModelClient

    args = ["--sensevoice-dir", str(cosyvoice3_models["sensevoice"]),
            "--prompt-bank", str(cosyvoice3_models["prompt_wav"]),
            "--instances-per-device", "1", "--max-batch-size", "8",
            "--engine-option", f"cosyvoice3_dir={cosyvoice3_models['cosyvoice3']}",
            "--engine-option", "flow_batch=true"]
    pythonpath = [str(cosyvoice_src), str(cosyvoice_src / "third_party" / "Matcha-TTS"), os.environ.get("PYTHONPATH")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, pythonpath)))
        server = start_server(engines=ENGINES, extra_args=args, devices="cpu", timeout=600)
    try:
        assert f"loading engines {ENGINES} on cpu" in server.log()
        token_lists = [ids.tolist() for ids in _tokens(5, (15, 40, 8))]
        texts = ("今天天气不错", "我们一起去公园", "你好")
        client = TritonModelClient(server.http_url, "token2wav_asr")
        try:
            tokens = np.zeros((3, 40), dtype=np.int32)
            for row, ids in enumerate(token_lists):
                tokens[row, :len(ids)] = ids
            out = client._infer({"TOKENS": tokens, "TOKEN_LENS": np.array([[len(t)] for t in token_lists], np.int32),
                                 "GT_TEXT": np.array([[t.encode()] for t in texts], dtype=object)},
                                ["REWARDS", "TRANSCRIPTS", "ERRORS"])
        finally:
            client.close()
        assert [e.decode() for e in out["ERRORS"].ravel()] == ["", "", ""]
        rewards = out["REWARDS"].ravel()
        assert rewards.shape == (3,) and np.all((rewards >= 0) & (rewards <= 1))
        assert all(isinstance(t, bytes) for t in out["TRANSCRIPTS"].ravel())
        synthesis = TritonModelClient(server.grpc_url, "token2wav")
        try:
            results = synthesis.synthesize(token_lists[:2])
        finally:
            synthesis.close()
        assert [r.wave.shape for r in results] == [(SAMPLES_PER_TOKEN * len(t),) for t in token_lists[:2]]
    finally:
        server.stop()
