"""The ``quality`` reward component (DNSMOS P.835 from the speechmos wheel, real weights) on real
speech (Debian's espeak-ng), through the real reward server and the reward hook; the same server
weights ``emotion`` (a tiny random emotion2vec+ built here), whose per-item target the hook sends
from ``extra_info``."""
import math
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import tritonclient.http as httpclient

import reward_tts
from tests.reward_utils import run
from token2wav_server.launch import server_python, start_server
from ttsrl.speech_tokens import format_speech_tokens
from ttsrl.triton_client.wire import text_column

SENTENCES = [("cmn", "今天天气很好，我们去公园散步吧。"), ("cmn", "请把窗户打开，让新鲜空气进来。"),
             ("en", "The quick brown fox jumps over the lazy dog.")]
KINDS = ("clean", "noisy", "tone", "silence")
SHORT = 999  # token of a clip too short to score
RATE = 22050  # espeak-ng's rate; the server resamples to DNSMOS's 16 kHz


def _speak(voice: str, text: str, path: pathlib.Path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    wave, rate = soundfile.read(path, dtype="float32")
    assert rate == RATE
    return np.asarray(wave, dtype=np.float32)


def _clips(directory: pathlib.Path) -> dict:
    """token id -> (sentence index, kind); writes <id>.wav for each."""
    rng = np.random.default_rng(0)
    tokens = {}
    for index, (voice, text) in enumerate(SENTENCES):
        clean = _speak(voice, text, directory / f"espeak_{index}.wav")
        clean = 0.5 * clean / np.max(np.abs(clean))
        noise = rng.standard_normal(clean.size).astype(np.float32)
        noise *= np.sqrt(np.mean(clean ** 2) / np.mean(noise ** 2))  # 0 dB SNR
        noisy = clean + noise
        noisy /= max(1.0, float(np.max(np.abs(noisy))))  # a common gain keeps the SNR
        tone = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(clean.size) / RATE).astype(np.float32)
        for kind, wave in zip(KINDS, (clean, noisy, tone, np.zeros_like(clean))):
            token = 4 * index + KINDS.index(kind)
            soundfile.write(directory / f"{token}.wav", wave, RATE, subtype="FLOAT")
            tokens[token] = (index, kind)
    soundfile.write(directory / f"{SHORT}.wav", np.full(100, 0.1, dtype=np.float32), RATE, subtype="FLOAT")
    return tokens


@pytest.fixture(scope="module")
def quality_server(tmp_path_factory):
    assert shutil.which("espeak-ng"), "espeak-ng is missing: apt-get install -y espeak-ng (scripts/run_tests.sh does)"
    directory = tmp_path_factory.mktemp("clips")
    tokens = _clips(directory)
    emotion_model = directory / "emotion2vec_tiny"
    subprocess.run([server_python(), "-c", "import sys; from ttsrl.tiny_models.emotion2vec import "
                    "write_tiny_emotion2vec as w; w(sys.argv[1])", str(emotion_model)], check=True)
    config = directory / "reward.yaml"
    config.write_text("components:\n  quality: token2wav_server.engines_dnsmos\n"
                      "  emotion: token2wav_server.engines_emotion2vec\n"
                      "weights: {error_rate: 1.0, quality: 1.0, emotion: 1.0}\n", encoding="utf-8")
    engines = str(pathlib.Path(__file__).with_name("clip_engines.py")) + ":create_engines"
    server = start_server(engines=engines, extra_args=[
        "--engine-option", f"clips={directory}", "--engine-option", f"emotion2vec_model={emotion_model}",
        "--reward-config", str(config), "--max-batch-size", "32"])
    try:
        yield server, tokens
    finally:
        server.stop()


def _infer(server, ids: list) -> dict:
    client = httpclient.InferenceServerClient(f"{server.host}:{server.http_port}", network_timeout=300)
    try:
        arrays = {"TOKENS": np.array([[i] for i in ids], dtype=np.int32),
                  "TOKEN_LENS": np.ones((len(ids), 1), dtype=np.int32),
                  "GT_TEXT": text_column("一" for _ in ids)}
        inputs = []
        for name, array in arrays.items():
            tensor = httpclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "INT32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer("token2wav_asr", inputs)
        names = ("REWARDS", "ERRORS", "UTILITY_QUALITY", "QUALITY_OVRL", "QUALITY_SIG", "QUALITY_BAK",
                 "UTILITY_ERROR_RATE", "UTILITY_EMOTION")
        return {name: result.as_numpy(name).reshape(-1) for name in names}
    finally:
        client.close()


def test_dnsmos_ranks_clean_speech_above_noise_tone_and_silence(quality_server):
    server, tokens = quality_server
    ids = sorted(tokens) + [SHORT]
    out = _infer(server, ids)  # one batch: the short clip fails alone
    errors = [e.decode() for e in out["ERRORS"]]
    assert f"request 0 row {len(tokens)}" in errors[-1] and "shorter than 320 samples" in errors[-1], errors[-1]
    assert math.isnan(out["REWARDS"][-1])
    assert errors[:-1] == [""] * len(tokens)
    ovrl = {tokens[i]: float(v) for i, v in zip(ids[:-1], out["QUALITY_OVRL"])}
    for index in range(len(SENTENCES)):
        clean = ovrl[(index, "clean")]
        for worse in ("noisy", "tone", "silence"):
            assert clean > ovrl[(index, worse)], (SENTENCES[index], worse, ovrl)
    for row in range(len(tokens)):
        assert 1.0 <= out["QUALITY_SIG"][row] <= 5.0 and 1.0 <= out["QUALITY_BAK"][row] <= 5.0
        utility = float(np.clip((out["QUALITY_OVRL"][row] - 1.0) / 4.0, 0.0, 1.0))
        assert out["UTILITY_QUALITY"][row] == pytest.approx(utility, abs=1e-6)
        # arithmetic mean of two equally weighted utilities (no emotion target: emotion left out)
        assert math.isnan(out["UTILITY_EMOTION"][row])
        assert out["REWARDS"][row] == pytest.approx((out["UTILITY_ERROR_RATE"][row] + utility) / 2, abs=1e-6)


def test_hook_reports_the_plugin_component_like_the_others(quality_server):
    server, tokens = quality_server
    clean = next(token for token, (_, kind) in tokens.items() if kind == "clean")
    kwargs = {"server_url": f"http://{server.host}:{server.http_port}", "startup_wait_s": 30,
              "request_timeout_s": 300}

    async def score():
        result = await reward_tts.compute_score("tts", format_speech_tokens([clean]), "一", **kwargs)
        happy = await reward_tts.compute_score("tts", format_speech_tokens([clean]), "一",
                                               extra_info={"emotion": "happy", "index": 3}, **kwargs)
        empty = await reward_tts.compute_score("tts", "", "一", **kwargs)
        return result, happy, empty

    result, happy, empty = run(score())
    assert {"utility_quality", "quality_ovrl", "quality_sig", "quality_bak", "utility_error_rate",
            "utility_emotion", "emotion_target_prob"} <= set(result)
    assert result["quality_ovrl"] > 2.0 and 0.0 < result["utility_quality"] < 1.0
    assert math.isnan(result["utility_emotion"])  # no target
    assert 0.0 < happy["utility_emotion"] == happy["emotion_target_prob"] < 1.0  # TARGET_EMOTION from extra_info
    assert happy["score"] == pytest.approx((happy["utility_error_rate"] + happy["utility_quality"]
                                            + happy["utility_emotion"]) / 3, abs=1e-6)
    assert empty["utility_quality"] == 0.0 and math.isnan(empty["quality_sig"])
