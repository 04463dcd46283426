"""The real reward server (Triton, PyTriton) with the real engines
(``token2wav_server.engines_cosyvoice2:create_engines``) on tiny random CosyVoice2,
SenseVoiceSmall and Paraformer models: two CPU slots, the real zero-shot prompt, every
served model end to end, and the confidence component from SenseVoice's own NLL."""
import concurrent.futures
import os

import numpy as np
import pytest

from token2wav_server.launch import start_server
from ttsrl.triton_client import TritonModelClient

SAMPLES_PER_TOKEN = 2 * 480  # 24 kHz: 2 mel frames per token, HiFT hop 480
REAL_ENGINES = "token2wav_server.engines_cosyvoice2:create_engines"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_server(real_models, tmp_path_factory):
    reward_config = tmp_path_factory.mktemp("config") / "reward.yaml"
    reward_config.write_text("metric: pinyin\nbeta: 3.0\nrule: arithmetic\nconfidence_tau: 50.0\n"
                             "weights:\n  error_rate: 1.0\n  similarity: 1.0\n  confidence: 1.0\n", encoding="utf-8")
    args = ["--cosyvoice2-dir", str(real_models.cosyvoice2_dir), "--sensevoice-dir", str(real_models.sensevoice_dir),
            "--asr-eval-dir", str(real_models.paraformer_dir), "--prompt-bank", str(real_models.prompt_wav),
            "--reward-config", str(reward_config), "--instances-per-device", "2", "--max-batch-size", "8",
            "--engine-option", "flow_batch=true"]
    with pytest.MonkeyPatch.context() as patch:
        # The server subprocess imports CosyVoice from the pinned source, as run.sh arranges.
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [real_models.pythonpath(),
                                                                  os.environ.get("PYTHONPATH")])))
        server = start_server(engines=REAL_ENGINES, extra_args=args, devices="cpu", timeout=600)
    try:
        yield server
    finally:
        server.stop()


def _token2wav_asr(url, token_lists, texts):
    client = TritonModelClient(url, "token2wav_asr")
    try:
        width = max(len(t) for t in token_lists)
        tokens = np.zeros((len(token_lists), width), dtype=np.int32)
        for row, ids in enumerate(token_lists):
            tokens[row, :len(ids)] = ids
        arrays = {"TOKENS": tokens, "TOKEN_LENS": np.array([[len(t)] for t in token_lists], dtype=np.int32),
                  "GT_TEXT": np.array([[t.encode()] for t in texts], dtype=object)}
        return client._infer(arrays, ["REWARDS", "TRANSCRIPTS", "ERROR_RATE", "SPEAKER_SIMILARITY", "ASR_NLL",
                                      "ERRORS"])
    finally:
        client.close()


def test_two_cpu_slots_with_the_real_engines(real_server):
    log = real_server.log()
    assert f"loading engines {REAL_ENGINES} on cpu (instance 1)" in log
    assert "2 slot(s), 1 prompt(s)" in log


def test_token2wav_asr_end_to_end(real_server):
    rng = np.random.default_rng(0)
    token_lists = [rng.integers(0, 6561, n).tolist() for n in (15, 40, 8)]
    out = _token2wav_asr(real_server.http_url, token_lists, ["今天天气不错", "我们一起去公园", "你好"])
    assert [e.decode() for e in out["ERRORS"].ravel()] == ["", "", ""]
    rewards = out["REWARDS"].ravel()
    assert np.all((rewards >= 0) & (rewards <= 1))
    assert all(isinstance(t, bytes) for t in out["TRANSCRIPTS"].ravel())
    assert np.all(np.isfinite(out["ASR_NLL"].ravel())) and np.all(out["ASR_NLL"].ravel() >= 0)
    assert np.all(np.abs(out["SPEAKER_SIMILARITY"].ravel()) <= 1.0 + 1e-6)


def test_token2wav_lengths_and_concurrent_requests_on_both_slots(real_server):
    rng = np.random.default_rng(1)
    requests = [[rng.integers(0, 6561, n).tolist() for n in (n0, n0 + 9)] for n0 in (5, 12, 20, 3)]

    def synthesize(token_lists):
        client = TritonModelClient(real_server.grpc_url, "token2wav")
        try:
            return client.synthesize(token_lists)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(synthesize, requests))
    for token_lists, syntheses in zip(requests, results):
        for ids, synthesis in zip(token_lists, syntheses):
            assert not isinstance(synthesis, Exception), synthesis
            assert synthesis.sample_rate == 24000
            assert synthesis.wave.shape == (SAMPLES_PER_TOKEN * len(ids),)
            assert np.isfinite(synthesis.wave).all() and np.abs(synthesis.wave).max() <= 1.0


def test_speaker_speech_tokenizer_and_asr_models(real_server, real_models):
    import soundfile

    prompt, rate = soundfile.read(str(real_models.prompt_wav), dtype="float32")
    noise = np.random.default_rng(2).normal(0, 0.1, 16000).astype(np.float32)
    url = real_server.http_url
    clients = {name: TritonModelClient(url, name) for name in ("speaker", "speech_tokenizer", "asr", "asr_eval")}
    try:
        embeddings = clients["speaker"].embed([prompt, noise], [rate, 16000])
        assert [e.shape for e in embeddings] == [(192,), (192,)] and not np.allclose(embeddings[0], embeddings[1])
        tokens = clients["speech_tokenizer"].tokenize([noise, prompt], [16000, rate])
        seconds = prompt.size / rate
        assert len(tokens[0]) == 25 and abs(len(tokens[1]) - 25 * seconds) <= 2
        assert all(0 <= t < 6561 for ids in tokens for t in ids)
        for name in ("asr", "asr_eval"):
            transcripts = clients[name].transcribe([noise, prompt], [16000, rate])
            assert all(isinstance(t, str) for t in transcripts), transcripts
    finally:
        for client in clients.values():
            client.close()


def test_bad_prompt_stops_start_up_with_its_name(real_models, tmp_path):
    import soundfile

    long_prompt = tmp_path / "long.wav"
    soundfile.write(str(long_prompt), np.full(16000 * 31, 0.1, np.float32), 16000)
    long_prompt.with_suffix(".txt").write_text("你好", encoding="utf-8")
    args = ["--cosyvoice2-dir", str(real_models.cosyvoice2_dir), "--sensevoice-dir", str(real_models.sensevoice_dir),
            "--prompt-bank", str(long_prompt)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", real_models.pythonpath())
        with pytest.raises(RuntimeError, match=r"speaker prompt 'long' \(.*long.wav\): 31.0 s long") as caught:
            start_server(engines=REAL_ENGINES, extra_args=args, devices="cpu", timeout=600)
    assert "exited with 2" in str(caught.value)
