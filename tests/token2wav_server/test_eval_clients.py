"""ttsrl.triton_client against the live reward server (stand-in engines): the evaluation
models ``speaker`` and ``speech_tokenizer`` over gRPC and HTTP."""
import numpy as np
import pytest

from token2wav_server import standin
from ttsrl.triton_client import ServerItemError, TritonModelClient, cosine_similarity, server_ready
from ttsrl.triton_client.ready import readiness_problem


def _url(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tokenize_returns_the_ids_of_standin_audio_and_item_errors(reward_server, protocol):
    assert server_ready(_url(reward_server, protocol), model="speech_tokenizer")
    waves = [standin.tokens_to_wave(standin.text_to_tokens(text)) for text in ("一丁七万", "三", "丈七万丁三上下")] * 3
    waves.insert(4, np.full(1000, 0.25, dtype=np.float32))  # not stand-in audio
    rates = [standin.SAMPLE_RATE] * len(waves)
    rates[5] = 5  # refused by the server's input check
    client = TritonModelClient(_url(reward_server, protocol), "speech_tokenizer")
    try:
        results = client.tokenize(waves, rates)
    finally:
        client.close()
    assert len(results) == 10  # more than one request of REQUEST_ITEMS
    for index, result in enumerate(results):
        if index == 4:
            assert isinstance(result, ServerItemError) and "not stand-in audio" in str(result)
        elif index == 5:
            assert isinstance(result, ServerItemError) and "SAMPLE_RATE 5" in str(result)
        else:
            assert result == standin.wave_to_tokens(waves[index]).tolist()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_embed_returns_the_standin_embeddings(reward_server, protocol):
    waves = [standin.tokens_to_wave([5, 6, 7]), np.sin(np.arange(3200) / 7.0).astype(np.float32)]
    client = TritonModelClient(_url(reward_server, protocol), "speaker")
    try:
        results = client.embed(waves, [16000, 16000])
    finally:
        client.close()
    np.testing.assert_allclose(np.stack(results), standin.StandinSpeaker().embed(waves), rtol=1e-6)
    assert cosine_similarity(results[0], results[0]) == pytest.approx(1.0, abs=1e-12)


def test_cosine_similarity():
    assert cosine_similarity([1, 0], [0, 2]) == 0.0
    assert cosine_similarity([1, 1], [2, 2]) == pytest.approx(1.0)
    assert cosine_similarity([1, 0], [-3, 0]) == pytest.approx(-1.0)
    assert cosine_similarity([0, 0], [1, 0]) == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        cosine_similarity([1, 0], [1, 0, 0])
    client = TritonModelClient("grpc://127.0.0.1:1", "speaker")  # nothing is sent: the check comes first
    try:
        with pytest.raises(ValueError, match="2 waveforms but 1 sample rates"):
            client.embed([np.zeros(3), np.zeros(3)], [16000])
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_synthesize_decodes_each_item_in_its_own_prompt_voice(reward_server, protocol):
    """Per-item prompts through the live server: 10 items (two requests), mixed prompts, the
    bank's voice for None, a bad prompt failing only its item; PROMPT_ID names the prompt used."""
    from ttsrl.triton_client import SpeakerPromptAudio, Synthesis

    prompts = [SpeakerPromptAudio(standin.tokens_to_wave([7, 8], voice=v), standin.SAMPLE_RATE, f"提示{v}")
               for v in (2, 11)]
    too_long = SpeakerPromptAudio(np.full(16000 * 31, 0.1, np.float32), 16000, "太长")
    items = [[i, i + 1] for i in range(10)]
    chosen = [prompts[i % 2] for i in range(10)]
    chosen[3], chosen[8] = None, too_long
    client = TritonModelClient(_url(reward_server, protocol), "token2wav")
    try:
        results = client.synthesize(items, chosen)
        plain = client.token2wav([[1, 2]])
    finally:
        client.close()
    for index, (result, prompt) in enumerate(zip(results, chosen)):
        if index == 8:
            assert isinstance(result, ServerItemError) and "over the maximum of 30 s" in str(result)
            continue
        assert isinstance(result, Synthesis) and standin.wave_to_tokens(result.wave).tolist() == items[index]
        if prompt is None:
            assert standin.wave_voice(result.wave) == 0 and result.prompt_id.startswith("bank:")
        else:
            assert standin.wave_voice(result.wave) == standin.wave_voice(prompt.wave)
            assert result.prompt_id == prompt.key
    assert np.array_equal(plain[0][0], standin.tokens_to_wave([1, 2]))  # tokens only: the bank's voice


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_readiness_problem_says_what_is_not_ready(reward_server, protocol):
    url = _url(reward_server, protocol)
    assert readiness_problem(url) is None and readiness_problem(url, model=None) is None
    assert readiness_problem(url, model="no_such_model") == "is up but model 'no_such_model' is not ready"
    assert not server_ready(url, model="no_such_model")


def test_requests_never_carry_more_items_than_the_server_takes(reward_server, monkeypatch):
    """The client sends at most the server's per-request limit (its model config's max_batch_size,
    64 here), whatever REQUEST_ITEMS says: 70 waves go as 64 + 6, not as one refused request."""
    from ttsrl.triton_client import model_client

    monkeypatch.setattr(model_client, "REQUEST_ITEMS", 100)
    client = TritonModelClient(reward_server.grpc_url, "asr")
    try:
        assert client.items_per_request == 64
        texts = client.transcribe([standin.tokens_to_wave([i % 50]) for i in range(70)], [standin.SAMPLE_RATE] * 70)
    finally:
        client.close()
    assert texts == [standin.tokens_to_text([i % 50]) for i in range(70)]
