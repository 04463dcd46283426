"""The Whisper evaluation ASR (``token2wav_server.engines_whisper``) on a tiny random Whisper
with large-v3's front end and tokenizer (128 mel bins, the 100-language multilingual
vocabulary of 51866 ids), saved in openai-whisper's checkpoint format; engine, errors,
``asr_eval_en`` wiring and a request through the real PyTriton server."""
import dataclasses
import math

import numpy as np
import pytest

from token2wav_server import cli, standin
from token2wav_server.engines import AsrResult, EngineOptions, Engines, SpeakerPrompt, resample
from token2wav_server.engines_whisper import WhisperAsr, check_whisper_checkpoint
from token2wav_server.reward_scoring import RewardConfig
from token2wav_server.serving import Pipeline, Slot
from ttsrl.tiny_models.asr import WHISPER_LARGE_V3_N_MELS as LARGE_V3_N_MELS
from ttsrl.tiny_models.asr import WHISPER_LARGE_V3_N_VOCAB as LARGE_V3_N_VOCAB


@pytest.fixture(scope="module")
def whisper_checkpoint(tmp_path_factory):
    """A tiny random Whisper in the format of large-v3.pt ({"dims", "model_state_dict"})."""
    from ttsrl.tiny_models.asr import write_tiny_whisper

    return write_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-large-v3.pt", seed=0)


@pytest.fixture(scope="module")
def engine(whisper_checkpoint):
    return WhisperAsr(str(whisper_checkpoint))


def _waves():
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.1, n).astype(np.float32) for n in (4000, 16000 * 3, 16000 * 7)]


def test_checkpoint_loads_as_a_large_v3_shaped_multilingual_model(engine):
    assert engine.model.dims.n_mels == LARGE_V3_N_MELS
    assert engine.model.is_multilingual and engine.model.num_languages == 100
    assert engine.sample_rate == 16000
    assert engine.fp16 is False  # fp16 only on CUDA
    assert (engine.options.language, engine.options.task, engine.options.temperature) == ("en", "transcribe", 0.0)


def test_batch_transcribes_each_wave_deterministically(engine):
    waves = _waves()
    results = engine.transcribe(waves)
    assert len(results) == len(waves)
    assert all(isinstance(r, AsrResult) and isinstance(r.text, str) and r.text for r in results)
    assert all(math.isfinite(r.nll) and r.nll >= 0 for r in results)
    assert [r.text for r in engine.transcribe(waves)] == [r.text for r in results]
    # each item is decoded on its own audio: alone it reads as in the batch, and the waves differ
    assert engine.transcribe(waves[1:2])[0].text == results[1].text
    assert len({r.text for r in results}) > 1, results
    assert engine.transcribe([]) == []


def test_wave_over_30_s_goes_through_long_form_decoding(engine):
    wave = np.random.default_rng(1).normal(0, 0.1, 16000 * 31).astype(np.float32)
    first, again = engine.transcribe([wave]), engine.transcribe([wave])
    assert first == again and first[0].text and math.isfinite(first[0].nll)


def test_bad_checkpoints_name_the_file(tmp_path):
    import torch

    with pytest.raises(FileNotFoundError, match=r"--asr-eval-en .*missing\.pt: no such file"):
        WhisperAsr(str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="needs --asr-eval-en"):
        check_whisper_checkpoint(None)
    # a model name is not a path: the engine never downloads
    with pytest.raises(FileNotFoundError, match="large-v3: no such file"):
        WhisperAsr("large-v3")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt: not a Whisper checkpoint"):
        WhisperAsr(str(garbage))
    no_dims = tmp_path / "no_dims.pt"
    torch.save({"state_dict": {}}, no_dims)
    with pytest.raises(ValueError, match=r"no_dims\.pt: not a Whisper checkpoint .*'dims'"):
        WhisperAsr(str(no_dims))


def test_mismatched_weights_name_the_file(whisper_checkpoint, tmp_path):
    import torch

    checkpoint = torch.load(whisper_checkpoint)
    checkpoint["dims"]["n_mels"] = 80  # large-v2's front end with v3's weights
    wrong = tmp_path / "wrong_dims.pt"
    torch.save(checkpoint, wrong)
    with pytest.raises(ValueError, match=r"(?s)wrong_dims\.pt: not a loadable Whisper checkpoint.*size mismatch"):
        WhisperAsr(str(wrong))


def test_empty_wave_names_the_item(engine):
    with pytest.raises(ValueError, match="waveform 1 of 2: empty"):
        engine.transcribe([_waves()[0], np.zeros(0, np.float32)])


def test_engines_bundle_checks_asr_eval_en():
    with pytest.raises(TypeError, match="'asr_eval_en' .* does not implement AsrEngine"):
        Engines(token2wav=standin.StandinToken2Wav(), asr=standin.StandinAsr(), asr_eval_en=object())


def _with_whisper(engine):
    return dataclasses.replace(standin.create_engines(EngineOptions()), asr_eval_en=engine)


def test_asr_eval_en_is_bound_like_asr_eval_when_every_slot_has_it(engine):
    from token2wav_server.triton_worker import bind_models

    class Recorder:  # records what bind_models asks PyTriton to serve
        def __init__(self):
            self.models = {}

        def bind(self, model_name, infer_func, inputs, outputs, config, strict):
            self.models[model_name] = ([t.name for t in inputs], [t.name for t in outputs], len(infer_func))

    prompts = [SpeakerPrompt("p0", standin.tokens_to_wave([1, 2, 3]), standin.SAMPLE_RATE, "p0")]
    pipeline = Pipeline(Slot(_with_whisper(engine), prompts), RewardConfig())
    without = Pipeline(Slot(standin.create_engines(EngineOptions()), prompts), RewardConfig())
    args = cli.build_parser().parse_args(["--devices", "cpu"])
    recorder = Recorder()
    models = bind_models(recorder, [pipeline, pipeline], args)
    assert models[:4] == ["token2wav", "asr", "asr_eval", "asr_eval_en"] and models[-1] == "token2wav_asr"
    assert recorder.models["asr_eval_en"] == recorder.models["asr_eval"]
    assert recorder.models["asr_eval_en"][2] == 2
    assert "asr_eval_en" not in bind_models(Recorder(), [pipeline, without], args)


def test_pipeline_resamples_to_16_khz_for_whisper(engine):
    prompts = [SpeakerPrompt("p0", standin.tokens_to_wave([1, 2, 3]), standin.SAMPLE_RATE, "p0")]
    pipeline = Pipeline(Slot(_with_whisper(engine), prompts), RewardConfig())
    wave = _waves()[1]
    wave_24k = resample(wave, 16000, 24000)
    out = pipeline.asr([{"WAV": wave_24k[None], "SAMPLE_RATE": np.array([[24000]], dtype=np.int32)}], None,
                       "asr_eval_en")[0]
    expected = engine.transcribe([resample(wave_24k, 24000, 16000)])[0]
    assert out["TRANSCRIPTS"].ravel()[0].decode() == expected.text
    assert out["ERRORS"].ravel()[0].decode() == ""
    assert out["ASR_NLL"].ravel()[0] == pytest.approx(expected.nll, abs=1e-4)


@pytest.mark.slow
def test_asr_eval_en_through_the_real_server(whisper_checkpoint, engine, tmp_path):
    from token2wav_server.launch import start_server
    from ttsrl.triton_client import TritonModelClient

    # The stand-in engines plus the real Whisper engine that --asr-eval-en names.
    factory = tmp_path / "standin_with_whisper.py"
    factory.write_text("import dataclasses\n"
                       "from token2wav_server import standin\n"
                       "from token2wav_server.engines_whisper import whisper_asr\n\n\n"
                       "def create_engines(options):\n"
                       "    return dataclasses.replace(standin.create_engines(options),\n"
                       "                               asr_eval_en=whisper_asr(options.asr_eval_en, options.device))\n",
                       encoding="utf-8")
    server = start_server(engines=f"{factory}:create_engines", extra_args=["--asr-eval-en", str(whisper_checkpoint)])
    try:
        assert "asr_eval_en" in server.log()
        client = TritonModelClient(server.http_url, "asr_eval_en")
        try:
            waves = _waves()[:2]
            wave_8k = resample(waves[1], 16000, 8000)
            transcripts = client.transcribe([waves[0], wave_8k, np.zeros(0, np.float32)], [16000, 8000, 16000])
        finally:
            client.close()
    finally:
        server.stop()
    expected = engine.transcribe([waves[0], resample(wave_8k, 8000, 16000)])
    assert transcripts[:2] == [r.text for r in expected]
    # an empty wave is refused by the server's request checks, in-band, before any engine sees it
    assert isinstance(transcripts[2], Exception) and "WAV_LENS is 0" in str(transcripts[2])


@pytest.mark.slow
def test_cosyvoice2_factory_builds_asr_eval_en_when_the_option_is_set(real_models, whisper_checkpoint, tmp_path):
    from token2wav_server import engines_cosyvoice2

    options = dict(cosyvoice2_dir=str(real_models.cosyvoice2_dir), sensevoice_dir=str(real_models.sensevoice_dir))
    # checked before any model loads, naming the option
    with pytest.raises(FileNotFoundError, match=r"--asr-eval-en .*missing\.pt: no such file"):
        engines_cosyvoice2.create_engines(EngineOptions(**options, asr_eval_en=str(tmp_path / "missing.pt")))
    engines = engines_cosyvoice2.create_engines(EngineOptions(**options, asr_eval_en=str(whisper_checkpoint)))
    assert isinstance(engines.asr_eval_en, WhisperAsr) and engines.asr_eval is None
    assert engines.asr_eval_en.model.dims.n_mels == LARGE_V3_N_MELS
