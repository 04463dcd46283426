"""The real reward server (Triton, stand-in engines) called from the trainer environment."""
import concurrent.futures
import math
import urllib.request

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import REWARD_SERVER_MAX_TOKENS
from token2wav_server.standin import SAMPLE_RATE, UNKNOWN_AUDIO_TEXT, text_to_tokens, tokens_to_wave
from ttsrl.reward_shaping import error_rate_utility

TEXT = "一丁七万"
WRONG = "一丁七三"  # one syllable of four differs (wan4 vs san1)


def _client(server, protocol):
    if protocol == "grpc":
        return grpcclient, grpcclient.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    return httpclient, httpclient.InferenceServerClient(f"{server.host}:{server.http_port}")


def _inputs(module, tokens, lens, texts, tokens_dtype="INT32"):
    arrays = [("TOKENS", tokens, tokens_dtype), ("TOKEN_LENS", lens, "INT32"), ("GT_TEXT", texts, "BYTES")]
    inputs = []
    for name, array, dtype in arrays:
        if array is None:
            continue
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _batch(items):
    """[(token ids, text bytes or str)] -> padded TOKENS, TOKEN_LENS, GT_TEXT arrays."""
    width = max(1, max(len(ids) for ids, _ in items))
    tokens = np.zeros((len(items), width), dtype=np.int32)
    for row, (ids, _) in enumerate(items):
        tokens[row, : len(ids)] = ids
    lens = np.array([[len(ids)] for ids, _ in items], dtype=np.int32)
    texts = np.array([[t.encode() if isinstance(t, str) else t] for _, t in items], dtype=object)
    return tokens, lens, texts


def _score(server, protocol, items, parameters=None):
    module, client = _client(server, protocol)
    try:
        result = client.infer("token2wav_asr", _inputs(module, *_batch(items)), parameters=parameters)
        return {name: result.as_numpy(name).reshape(-1) for name in
                ("REWARDS", "TRANSCRIPTS", "ERROR_RATE", "SPEAKER_SIMILARITY", "ASR_NLL", "ERRORS")}
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_single_request_scores_perfect_and_wrong_transcripts(reward_server, protocol):
    perfect = _score(reward_server, protocol, [(text_to_tokens(TEXT), TEXT)])
    assert perfect["REWARDS"][0] == pytest.approx(1.0)
    assert perfect["ERROR_RATE"][0] == 0.0
    assert perfect["TRANSCRIPTS"][0].decode() == TEXT
    assert perfect["ERRORS"][0] == b""
    assert math.isnan(perfect["SPEAKER_SIMILARITY"][0])  # weight 0 in configs/reward.yaml: not computed

    wrong = _score(reward_server, protocol, [(text_to_tokens(WRONG), TEXT)])
    assert wrong["ERROR_RATE"][0] == pytest.approx(0.25)
    assert wrong["REWARDS"][0] == pytest.approx(error_rate_utility(0.25, 3.0), rel=1e-6)
    assert wrong["TRANSCRIPTS"][0].decode() == WRONG


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_batched_request_with_padding(reward_server, protocol):
    items = [(text_to_tokens("三上下"), "三上下"), (text_to_tokens("一"), "一丁"), (text_to_tokens("丈七万丁"), "丈七万丁")]
    out = _score(reward_server, protocol, items)
    assert [t.decode() for t in out["TRANSCRIPTS"]] == ["三上下", "一", "丈七万丁"]
    assert out["ERROR_RATE"].tolist() == pytest.approx([0.0, 0.5, 0.0])
    assert out["REWARDS"].tolist() == pytest.approx([1.0, error_rate_utility(0.5), 1.0], rel=1e-6)


def test_reference_json_payload(reward_server):
    """The reference recipe's client: one JSON POST, reward read from outputs[0]."""
    ids = text_to_tokens(WRONG)
    payload = {"inputs": [
        {"name": "TOKENS", "shape": [1, len(ids)], "datatype": "INT32", "data": [ids]},
        {"name": "TOKEN_LENS", "shape": [1, 1], "datatype": "INT32", "data": [[len(ids)]]},
        {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [TEXT]},
    ]}
    response = requests.post(f"{reward_server.http_url}/v2/models/token2wav_asr/infer", json=payload,
                             params={"request_id": "0"}, timeout=30)
    response.raise_for_status()
    result = response.json()
    assert result["outputs"][0]["name"] == "REWARDS"
    assert float(result["outputs"][0]["data"][0]) == pytest.approx(error_rate_utility(0.25), rel=1e-6)


def test_token2wav_and_asr_models(reward_server):
    module, client = _client(reward_server, "grpc")
    try:
        ids = [text_to_tokens("一丁七"), text_to_tokens("万")]
        tokens, lens, _ = _batch([(ids[0], ""), (ids[1], "")])
        result = client.infer("token2wav", _inputs(module, tokens, lens, None))
        waves, wave_lens = result.as_numpy("WAV"), result.as_numpy("WAV_LENS").reshape(-1)
        assert result.as_numpy("SAMPLE_RATE").reshape(-1).tolist() == [SAMPLE_RATE, SAMPLE_RATE]
        for row, item in enumerate(ids):
            assert np.array_equal(waves[row, : wave_lens[row]], tokens_to_wave(item))

        def asr(wave, rate):
            inputs = []
            for name, array, dtype in (("WAV", wave.reshape(1, -1).astype(np.float32), "FP32"),
                                       ("SAMPLE_RATE", np.array([[rate]], dtype=np.int32), "INT32")):
                tensor = module.InferInput(name, list(array.shape), dtype)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            out = client.infer("asr", inputs)
            return out.as_numpy("TRANSCRIPTS").reshape(-1)[0].decode(), out.as_numpy("ERRORS").reshape(-1)[0]

        assert asr(tokens_to_wave(ids[0]), SAMPLE_RATE) == ("一丁七", b"")
        noise = np.random.default_rng(0).uniform(-0.5, 0.5, 8000).astype(np.float32)
        assert asr(noise, 8000) == (UNKNOWN_AUDIO_TEXT, b"")  # real (non-stand-in) audio, resampled
    finally:
        client.close()


def test_prompt_parameter_selects_a_prompt_and_unknown_prompt_is_an_item_error(reward_server):
    ok = _score(reward_server, "grpc", [(text_to_tokens(TEXT), TEXT)], parameters={"prompt": "silence"})
    assert ok["REWARDS"][0] == pytest.approx(1.0)
    bad = _score(reward_server, "grpc", [(text_to_tokens(TEXT), TEXT)], parameters={"prompt": "nobody"})
    assert "unknown prompt 'nobody'" in bad["ERRORS"][0].decode()
    assert math.isnan(bad["REWARDS"][0])


GOOD = (text_to_tokens(TEXT), TEXT)
ITEM_ERRORS = {
    "id above vocab": ([5, 6561, 7], TEXT, "speech token id 6561 at position 1 is outside [0, 6561)"),
    "negative id": ([-1, 3], TEXT, "speech token id -1 at position 0"),
    "non-utf8 text": (text_to_tokens(TEXT), b"\xff\xfe", "GT_TEXT is not valid UTF-8"),
    "empty text": (text_to_tokens(TEXT), "", "GT_TEXT is empty"),
    "blank text": (text_to_tokens(TEXT), "   ", "GT_TEXT is empty"),
    "text with nothing to score": (text_to_tokens(TEXT), "。，！", "GT_TEXT has nothing to score"),
    "too many tokens": ([1] * (REWARD_SERVER_MAX_TOKENS + 1), TEXT, "over the server's maximum of 1000"),
}


def _assert_next_good_request_succeeds(server):
    out = _score(server, "grpc", [GOOD])
    assert out["ERRORS"][0] == b"" and out["REWARDS"][0] == pytest.approx(1.0)


@pytest.mark.parametrize("case", sorted(ITEM_ERRORS))
def test_bad_item_gets_its_own_error_and_does_not_poison_its_batch(reward_server, case):
    ids, text, message = ITEM_ERRORS[case]
    out = _score(reward_server, "grpc", [GOOD, (ids, text), GOOD])
    assert message in out["ERRORS"][1].decode()
    assert math.isnan(out["REWARDS"][1])
    assert out["ERRORS"][0] == out["ERRORS"][2] == b""
    assert out["REWARDS"][0] == out["REWARDS"][2] == pytest.approx(1.0)
    _assert_next_good_request_succeeds(reward_server)


def test_lengths_that_disagree_with_the_data(reward_server):
    module, client = _client(reward_server, "grpc")
    try:
        tokens, _, texts = _batch([GOOD, GOOD])
        for lens, message in (([[4], [9]], "TOKEN_LENS is 9 but TOKENS has only 4 values"),
                              ([[4], [-2]], "TOKEN_LENS is -2: must be >= 0")):
            result = client.infer("token2wav_asr", _inputs(module, tokens, np.array(lens, dtype=np.int32), texts))
            errors = result.as_numpy("ERRORS").reshape(-1)
            assert errors[0] == b"" and message in errors[1].decode()
    finally:
        client.close()
    _assert_next_good_request_succeeds(reward_server)


def test_zero_speech_tokens_get_the_documented_minimum(reward_server):
    out = _score(reward_server, "grpc", [([], TEXT), GOOD])
    assert out["ERRORS"].tolist() == [b"", b""]
    assert out["REWARDS"].tolist() == pytest.approx([0.0, 1.0])
    assert out["ERROR_RATE"][0] == 1.0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", ["int64 tokens", "float text", "batch size mismatch", "3-D tokens"])
def test_protocol_errors_are_refused_by_triton(reward_server, protocol, case):
    module, client = _client(reward_server, protocol)
    tokens, lens, texts = _batch([GOOD])
    try:
        if case == "int64 tokens":
            inputs = _inputs(module, tokens.astype(np.int64), lens, texts, tokens_dtype="INT64")
        elif case == "float text":
            inputs = _inputs(module, tokens, lens, None)
            tensor = module.InferInput("GT_TEXT", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 1), dtype=np.float32))
            inputs.append(tensor)
        elif case == "batch size mismatch":
            inputs = _inputs(module, np.concatenate([tokens, tokens]), np.concatenate([lens, lens]), texts)
        else:
            inputs = _inputs(module, tokens.reshape(1, 1, -1), lens, texts)
        with pytest.raises(InferenceServerException) as error:
            client.infer("token2wav_asr", inputs)
        assert "token2wav_asr" in str(error.value) or "GT_TEXT" in str(error.value) or "TOKENS" in str(error.value)
    finally:
        client.close()
    _assert_next_good_request_succeeds(reward_server)


def test_missing_ground_truth_is_an_item_error(reward_server):
    module, client = _client(reward_server, "http")
    tokens, lens, _ = _batch([GOOD])
    try:
        result = client.infer("token2wav_asr", _inputs(module, tokens, lens, None))
        assert result.as_numpy("ERRORS").reshape(-1)[0] == b"GT_TEXT is missing"
    finally:
        client.close()
    _assert_next_good_request_succeeds(reward_server)


def test_concurrent_bad_and_good_requests_are_isolated(reward_server):
    """Many single-item requests at once, so Triton batches good and bad ones together."""
    cases = [GOOD, ([6561], TEXT), (text_to_tokens(WRONG), TEXT), (GOOD[0], b"\xff")] * 16

    def one(item):
        return _score(reward_server, "grpc", [item])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, cases))
    for (ids, text), out in zip(cases, outs):
        if ids == [6561] or text == b"\xff":
            assert out["ERRORS"][0] != b""
        elif text == TEXT and ids == GOOD[0]:
            assert out["REWARDS"][0] == pytest.approx(1.0)
        else:
            assert out["REWARDS"][0] == pytest.approx(error_rate_utility(0.25), rel=1e-6)


def test_metrics_port_answers(reward_server):
    url = f"http://{reward_server.host}:{reward_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    assert 'nv_inference_request_success{model="token2wav_asr"' in body


def _score_with_languages(server, protocol, items, languages):
    module, client = _client(server, protocol)
    try:
        inputs = _inputs(module, *_batch(items))
        column = np.array([[language.encode()] for language in languages], dtype=object)
        tensor = module.InferInput("LANGUAGE", list(column.shape), "BYTES")
        tensor.set_data_from_numpy(column)
        result = client.infer("token2wav_asr", inputs + [tensor])
        return {name: result.as_numpy(name).reshape(-1) for name in ("ERROR_RATE", "ERRORS")}
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_language_input_picks_each_items_metric(reward_server, protocol):
    # 他 and 她 are homophones: zh's pinyin rate is 0, ja's CER counts one character of four;
    # an empty cell scores as a request without LANGUAGE (the configured metric)
    homophone = (text_to_tokens("她一丁七"), "他一丁七")
    result = _score_with_languages(reward_server, protocol, [homophone] * 4, ["zh", "ja", "", "klingon"])
    assert list(result["ERROR_RATE"][:3]) == [0.0, pytest.approx(0.25), 0.0]
    assert list(result["ERRORS"][:3]) == [b"", b"", b""]
    assert math.isnan(result["ERROR_RATE"][3])
    assert "unknown language 'klingon'" in result["ERRORS"][3].decode()
