"""The CosyVoice2 engines on the real pinned CosyVoice code with tiny random weights
(ttsrl.tiny_models.cosyvoice2, scripts/make_tiny_cosyvoice2.py --full): prompt preparation from the real
asset/zero_shot_prompt.wav, synthesis lengths, batched flow decoding, speaker and speech
tokenizer, and the errors for bad model directories and prompts."""
import shutil

import numpy as np
import pytest
import soundfile
import torch

from token2wav_server import engines_cosyvoice2
from token2wav_server.engines import EngineOptions, SpeakerPrompt
from token2wav_server.engines_cosyvoice2 import (CampplusSpeaker, CosyVoice2SpeechTokenizer, CosyVoice2Token2Wav,
                                                 check_cosyvoice2_dir)
from token2wav_server.prompt_bank import KNOWN_TRANSCRIPTS, PromptBankError, load_prompts
from tests.server.flow_utils import assert_batched_flow_matches_serial

SAMPLES_PER_TOKEN = 2 * 480  # CosyVoice2: 2 mel frames per speech token, HiFT hop 480 at 24 kHz


@pytest.fixture(scope="module")
def token2wav(real_models):
    return CosyVoice2Token2Wav(str(real_models.cosyvoice2_dir), "cpu")


@pytest.fixture(scope="module")
def zero_shot_prompt(real_models):
    (prompt,) = load_prompts(str(real_models.prompt_wav))
    return prompt


@pytest.fixture(scope="module")
def prepared(token2wav, zero_shot_prompt):
    return token2wav.prepare_prompt(zero_shot_prompt)


def test_tiny_directory_has_the_real_layout(real_models):
    import onnxruntime

    directory = check_cosyvoice2_dir(str(real_models.cosyvoice2_dir), load_jit=False)
    assert (directory / "cosyvoice2.yaml").read_text().count("!new:cosyvoice.") >= 6
    campplus = onnxruntime.InferenceSession(str(directory / "campplus.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in campplus.get_inputs()] == [("input", ["B", "T", 80])]
    assert [(o.name, o.shape) for o in campplus.get_outputs()] == [("output", ["B", 192])]
    tokenizer = onnxruntime.InferenceSession(str(directory / "speech_tokenizer_v2.onnx"),
                                             providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in tokenizer.get_inputs()] == [
        ("feats", [1, 128, "T"], "tensor(float)"), ("feats_length", [1], "tensor(int32)")]
    assert [o.name for o in tokenizer.get_outputs()] == ["indices"]


def test_model_and_frontend_are_pinned_to_the_slot_device(token2wav):
    """Upstream leaves both on the bare default device; the engine pins them to its slot's."""
    assert token2wav.cosyvoice.model.device == token2wav.cosyvoice.frontend.device == torch.device("cpu")
    assert token2wav.cosyvoice.model.llm is None  # freed: the reward server never runs the LLM
    assert next(token2wav.cosyvoice.model.hift.parameters()).dtype == torch.float32


def test_prompt_from_the_real_zero_shot_wav(prepared, zero_shot_prompt):
    assert zero_shot_prompt.text == KNOWN_TRANSCRIPTS["zero_shot_prompt.wav"]
    tokens, feat, embedding = (prepared[k] for k in ("flow_prompt_speech_token", "prompt_speech_feat",
                                                     "flow_embedding"))
    seconds = zero_shot_prompt.wave.size / zero_shot_prompt.sample_rate
    assert tokens.dtype == torch.int32 and tokens.shape[0] == 1
    assert abs(tokens.shape[1] - 25 * seconds) <= 2  # 25 tokens per second
    assert feat.shape == (1, 2 * tokens.shape[1], 80)  # CosyVoice2: exactly 2 mel frames per token
    assert embedding.shape == (1, 192) and torch.isfinite(feat).all() and torch.isfinite(embedding).all()
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 6561


def test_prompt_features_equal_cosyvoice_frontend_extractors(token2wav, prepared, real_models, monkeypatch):
    """Our wav-free feature path computes what CosyVoice's own frontend extractors compute.
    Upstream's load_wav needs torchcodec (torchaudio.load); here it is replaced, for the
    comparison only, by soundfile plus the same torchaudio resampler it applies."""
    import cosyvoice.cli.frontend as frontend_module
    import torchaudio

    def load_wav(path, target_sr, min_sr=16000):
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        speech = torch.from_numpy(data.mean(axis=1, keepdims=True).T.copy())
        return speech if rate == target_sr else torchaudio.transforms.Resample(rate, target_sr)(speech)

    monkeypatch.setattr(frontend_module, "load_wav", load_wav)
    upstream = token2wav.cosyvoice.frontend.frontend_zero_shot("你好", KNOWN_TRANSCRIPTS["zero_shot_prompt.wav"],
                                                               str(real_models.prompt_wav), 24000, "")
    for key in ("flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding"):
        assert prepared[key].shape == upstream[key].shape, key
        torch.testing.assert_close(prepared[key], upstream[key], rtol=0, atol=0)


def test_synthesis_gives_960_samples_per_token(token2wav, prepared):
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 6561, n) for n in (12, 30, 1)]
    waves = token2wav.synthesize(batch, [prepared] * len(batch))
    assert token2wav.sample_rate == 24000
    assert [w.shape for w in waves] == [(SAMPLES_PER_TOKEN * len(t),) for t in batch]
    assert all(w.dtype == np.float32 and np.isfinite(w).all() and np.abs(w).max() <= 1.0 for w in waves)


def test_batched_flow_decoding_matches_item_by_item(token2wav, prepared, zero_shot_prompt):
    """One padded classifier-free-guidance batch through the estimator gives the same mel as
    flow.inference per item. Measured difference: about 3e-6 on mels of magnitude ~6 (float32
    rounding: batched matmuls sum in another order). Tolerance 1e-4 absolute: 30x that, still
    five orders of magnitude below the mel values, so a padding leak (a wrong mask, noise or
    prompt offset) could not pass."""
    short = SpeakerPrompt("short", zero_shot_prompt.wave[:16000 * 2], 16000, "希望你以后")
    prompts = [prepared, token2wav.prepare_prompt(short), prepared]
    rng = np.random.default_rng(1)
    batch = [rng.integers(0, 6561, n) for n in (20, 7, 33)]
    assert_batched_flow_matches_serial(token2wav, batch, prompts)


def test_speaker_and_speech_tokenizer(token2wav, zero_shot_prompt):
    speaker, tokenizer = CampplusSpeaker(token2wav), CosyVoice2SpeechTokenizer(token2wav)
    assert speaker.sample_rate == tokenizer.sample_rate == 16000
    noise = np.random.default_rng(2).normal(0, 0.1, 16000).astype(np.float32)
    embeddings = speaker.embed([zero_shot_prompt.wave, noise])
    assert embeddings.shape == (2, 192) and embeddings.dtype == np.float32
    assert not np.allclose(embeddings[0], embeddings[1])
    tokens = tokenizer.tokenize([noise, zero_shot_prompt.wave[:8000]])
    assert [t.shape for t in tokens] == [(25,), (13,)]  # 25 per second, rounded up
    assert all(t.dtype == np.int64 and t.min() >= 0 and t.max() < 6561 for t in tokens)
    with pytest.raises(ValueError, match="reads at most 30 s"):
        tokenizer.tokenize([np.zeros(16000 * 31, dtype=np.float32)])


@pytest.mark.parametrize("seconds, rate, message", [
    (31.0, 16000, r"speaker prompt 'p' \(.*p.wav\): 31.0 s long, over the maximum of 30 s"),
    (0.4, 16000, r"speaker prompt 'p' \(.*p.wav\): 0.40 s long, under the minimum of 1 s"),
    (2.0, 8000, r"speaker prompt 'p' \(.*p.wav\): sample rate 8000 Hz"),
])
def test_bad_prompt_wavs_get_a_clear_error(token2wav, tmp_path, seconds, rate, message):
    wav = tmp_path / "p.wav"
    soundfile.write(str(wav), np.full(int(seconds * rate), 0.1, np.float32), rate)
    wav.with_suffix(".txt").write_text("你好", encoding="utf-8")
    (prompt,) = load_prompts(str(wav))
    with pytest.raises(PromptBankError, match=message):
        token2wav.prepare_prompt(prompt)


def test_unreadable_prompt_wav_is_named(tmp_path):
    wav = tmp_path / "broken.wav"
    wav.write_bytes(b"RIFF not really a wav")
    wav.with_suffix(".txt").write_text("你好", encoding="utf-8")
    with pytest.raises(PromptBankError, match=r"cannot read prompt wav .*broken.wav"):
        load_prompts(str(wav))


def test_server_start_up_fails_on_a_bad_prompt_naming_it(real_models, tmp_path):
    """The error reaches the operator at start-up (the slot prepares every bank prompt)."""
    from token2wav_server.serving import Slot
    from token2wav_server.engines import Engines
    from token2wav_server import standin

    short = tmp_path / "short.wav"
    soundfile.write(str(short), np.full(4000, 0.1, np.float32), 16000)
    short.with_suffix(".txt").write_text("你好", encoding="utf-8")
    token2wav = CosyVoice2Token2Wav(str(real_models.cosyvoice2_dir), "cpu")
    engines = Engines(token2wav=token2wav, asr=standin.StandinAsr())
    with pytest.raises(PromptBankError, match=r"speaker prompt 'short' \(.*short.wav\): 0.25 s long"):
        Slot(engines, load_prompts(str(short)))


def test_missing_files_are_named_with_what_provides_them(real_models, tmp_path):
    broken = tmp_path / "cv2"
    shutil.copytree(real_models.cosyvoice2_dir, broken)
    (broken / "llm.pt").unlink()
    shutil.rmtree(broken / "CosyVoice-BlankEN")
    with pytest.raises(FileNotFoundError) as caught:
        check_cosyvoice2_dir(str(broken))
    message = str(caught.value)
    for name in ("llm.pt", "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/tokenizer_config.json",
                 "CosyVoice-BlankEN/model.safetensors"):
        assert name in message
    assert "iic/CosyVoice2-0.5B" in message and "flow.pt" not in message
    with pytest.raises(FileNotFoundError, match=r"flow.encoder.fp32.zip \(the JIT-exported flow encoder"):
        check_cosyvoice2_dir(str(real_models.cosyvoice2_dir), load_jit=True)
    with pytest.raises(FileNotFoundError, match=r"flow.encoder.fp16.zip"):
        check_cosyvoice2_dir(str(real_models.cosyvoice2_dir), load_jit=True, fp16=True)


def test_engine_options(real_models):
    options = EngineOptions(cosyvoice2_dir=str(real_models.cosyvoice2_dir), sensevoice_dir=str(real_models.sensevoice_dir),
                            extra={"flow_batch": "maybe"})
    with pytest.raises(ValueError, match="--engine-option flow_batch='maybe': expected true or false"):
        engines_cosyvoice2.create_engines(options)
    assert engines_cosyvoice2.parse_bool_option(EngineOptions(extra={"flow_batch": "True"}), "flow_batch") is True
    assert engines_cosyvoice2.parse_bool_option(EngineOptions(), "flow_batch") is False
    with pytest.raises(ValueError, match="TensorRT"):
        CosyVoice2Token2Wav(str(real_models.cosyvoice2_dir), "cpu", load_trt=True, flow_batch=True)


def test_cosyvoice_source_comes_from_env_or_the_pinned_archive_else_an_error(monkeypatch, tmp_path):
    from ttsrl import cosyvoice_source as builder

    monkeypatch.delenv("cosyvoice_src", raising=False)
    if builder.PINNED_SOURCE_ARCHIVE.is_file():
        source = builder.unpack_pinned_source(root=tmp_path / "cache")
        assert (source / "asset" / "zero_shot_prompt.wav").is_file()
        assert builder.unpack_pinned_source(root=tmp_path / "cache") == source  # once
        assert [p.name for p in (tmp_path / "cache").iterdir()] == ["cosyvoice-ace7c47"]  # no staging left
    monkeypatch.setattr(builder, "PINNED_SOURCE_ARCHIVE", tmp_path / "missing.tar.gz")
    with pytest.raises(FileNotFoundError, match=r"set \$cosyvoice_src .* or provide .*missing.tar.gz"):
        builder.find_cosyvoice_source()
    monkeypatch.setenv("cosyvoice_src", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a CosyVoice checkout"):
        builder.find_cosyvoice_source()


def test_fp16_branch_rehearsed_on_the_cpu(real_models, token2wav, zero_shot_prompt):
    """--fp16 (the default on CUDA) on the CPU, changing only what a CPU forces (the autocast's
    device type: the CPU's float16 autocast instead of CUDA's): the flow runs in mixed precision,
    one by one and batched alike, and HiFT stays in fp32 outside autocast, as upstream
    CosyVoice2Model.token2wav runs it (the same mel vocodes to the same samples)."""
    half = CosyVoice2Token2Wav(str(real_models.cosyvoice2_dir), "cpu", fp16=True, cosyvoice=token2wav.cosyvoice)
    # a 1 s prompt keeps the flow short (CPU float16 is slow)
    prepared = token2wav.prepare_prompt(SpeakerPrompt("short", zero_shot_prompt.wave[:16000], 16000, "希望"))
    rng = np.random.default_rng(4)
    batch = [rng.integers(0, 6561, n) for n in (7, 4)]
    full_mels = token2wav.mels(batch, [prepared] * 2)
    half_mels = half.mels(batch, [prepared] * 2)
    for full, mixed in zip(full_mels, half_mels):
        assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
        assert 0 < (mixed - full).abs().max() < 0.05 * full.abs().max()  # fp16 rounding: changed, not broken
    half.flow_batch = True
    for serial, batched in zip(half_mels, half.mels(batch, [prepared] * 2)):
        torch.testing.assert_close(batched, serial, rtol=0, atol=0.05 * float(serial.abs().max()))
    torch.manual_seed(0)
    reference = token2wav.vocode(full_mels[0])
    torch.manual_seed(0)
    np.testing.assert_array_equal(half.vocode(full_mels[0]), reference)


def test_a_training_server_gets_no_evaluation_models_from_the_factory(real_models):
    """What the factory loads for --models training: no Paraformer even when --asr-eval-dir is given,
    no evaluation speaker model; CAM++ as the reward's speaker only when similarity is weighted."""
    from token2wav_server.engines import wanted_engines

    def build(components):
        return engines_cosyvoice2.create_engines(EngineOptions(
            cosyvoice2_dir=str(real_models.cosyvoice2_dir), sensevoice_dir=str(real_models.sensevoice_dir),
            asr_eval_dir=str(real_models.paraformer_dir), engines=wanted_engines("training", components)))

    plain = build(["error_rate"])
    assert plain.asr_eval is None and plain.speaker is None and plain.reward_speaker is None
    assert plain.speech_tokenizer is not None and plain.asr is not None
    zero_shot = build(["error_rate", "similarity"])
    assert zero_shot.speaker is None and isinstance(zero_shot.reward_speaker, CampplusSpeaker)
    assert zero_shot.similarity_speaker is zero_shot.reward_speaker
