"""The HTTP guard: what it refuses, and a real server that survives every malformed request.

The crash it prevents is real: an unguarded Triton (PyTriton 0.7's tritonserver 2.51) dies
on a JSON body of 200 KB of '[' (upstream triton-inference-server issue 5840). If
``test_unguarded_triton_dies_on_deeply_nested_json`` ever fails, upstream fixed the crash.
"""
import gzip
import json
import socket

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from token2wav_server.http_guard import GuardLimits, check_body, check_items, check_json, json_depth
from token2wav_server.launch import start_server
from token2wav_server.standin import text_to_tokens

TEXT = "一丁七万"
MAX_BODY_MB = 2
NESTED_200K = b"[" * 200_000  # kills an unguarded Triton


# ---- the checks -------------------------------------------------------------------------
def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b'{"a": [1, [2, {"b": 3}]]}') == 4
    assert json_depth(b'{"a": "[[[[[[[[", "b": "\\"[[[["}') == 1
    assert json_depth(b"3") == 0
    assert json_depth(b"[]" * 1000) == 1
    assert json_depth(NESTED_200K) == 200_000


def test_check_json_refuses_deep_nesting_malformed_and_non_utf8():
    assert check_json(b'{"inputs": [{"data": [[1, 2]]}]}') is None
    assert "nested 65 levels deep; the limit is 64" in check_json(b"[" * 65 + b"]" * 65)
    assert check_json(b"[" * 64 + b"]" * 64) is None
    assert "nested 200000 levels" in check_json(NESTED_200K)
    assert "not valid JSON" in check_json(b'{"inputs": [')
    assert "not valid JSON" in check_json(b"")
    assert "not valid UTF-8" in check_json(b'{"a": "\xff\xfe"}')


def test_check_body_reads_the_json_header_of_binary_requests():
    header = b'{"inputs": [{"name": "TOKENS", "shape": [1, 2], "datatype": "INT32", '\
             b'"parameters": {"binary_data_size": 8}}]}'
    body = header + np.array([1, 2], dtype=np.int32).tobytes()
    length = {"Inference-Header-Content-Length": str(len(header))}
    assert check_body(length, body) is None
    assert "not valid JSON" in check_body({}, body)  # the same bytes as a JSON request
    assert "outside the body's" in check_body({"Inference-Header-Content-Length": str(len(body) + 1)}, body)
    assert "outside the body's" in check_body({"Inference-Header-Content-Length": "0"}, body)
    assert "not a whole number" in check_body({"Inference-Header-Content-Length": "12x"}, body)
    nested = NESTED_200K + b"\0" * 8
    assert "JSON header of the binary request is JSON nested" in check_body(
        {"Inference-Header-Content-Length": str(len(NESTED_200K))}, nested)
    assert check_body({}, b"") is None  # GET requests


def test_a_request_over_the_item_limit_is_named_by_input_and_shape():
    body = json.dumps({"inputs": [{"name": "TOKENS", "shape": [9, 3], "datatype": "INT32", "data": [1] * 27},
                                  {"name": "GT_TEXT", "shape": [9, 1], "datatype": "BYTES", "data": ["x"] * 9}]})
    assert check_items({}, body.encode(), 8) == (
        "input 'TOKENS' has 9 items (the first dimension of its shape [9, 3]): this reward server takes at most 8 "
        "items per request (--max-batch-size; the model config's max_batch_size); send them in several requests")
    assert check_items({}, body.encode(), 9) is None
    header = b'{"inputs": [{"name": "WAV", "shape": [12, 2], "datatype": "FP32", "parameters": {"binary_data_size": 96}}]}'
    binary = header + np.zeros(24, dtype=np.float32).tobytes()
    assert "input 'WAV' has 12 items" in check_items({"Inference-Header-Content-Length": str(len(header))}, binary, 8)
    assert check_items({}, b"", 8) is None and check_items({}, b'{"inputs": "x"}', 8) is None


def test_limits_are_checked():
    with pytest.raises(ValueError, match="at least 1 byte"):
        GuardLimits(max_body_bytes=0)


# ---- a real server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    server = start_server(extra_args=["--http-max-body-mb", str(MAX_BODY_MB), "--max-batch-size", "8"])
    try:
        # A first start that failed on a loaded machine was retried: count from here.
        server.starts_at_ready = _metric(server, "token2wav_server_worker_starts_total")
        yield server
    finally:
        server.stop()


def _reference_payload(text=TEXT, ids=None):
    """The reference recipe's JSON request (tests/token2wav_server/test_serving.py)."""
    ids = text_to_tokens(text) if ids is None else ids
    return {"inputs": [
        {"name": "TOKENS", "shape": [1, len(ids)], "datatype": "INT32", "data": [ids]},
        {"name": "TOKEN_LENS", "shape": [1, 1], "datatype": "INT32", "data": [[len(ids)]]},
        {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [text]},
    ]}


def _binary_request(text=TEXT):
    ids = np.array([text_to_tokens(text)], dtype=np.int32)
    inputs = []
    texts = np.array([[text.encode()]], dtype=object)
    for name, array, dtype in (("TOKENS", ids, "INT32"), ("GT_TEXT", texts, "BYTES")):
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput("REWARDS", binary_data=True)]
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    return body, header_length


def _infer_url(server):
    return f"{server.http_url}/v2/models/token2wav_asr/infer"


def _assert_serves_good_requests(server):
    """The next good request after a bad one is served normally, over both protocols."""
    response = requests.post(_infer_url(server), json=_reference_payload(), params={"request_id": "0"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["name"] == "REWARDS"
    assert response.json()["outputs"][0]["data"][0] == pytest.approx(1.0)
    client = grpcclient.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    try:
        ids = np.array([text_to_tokens(TEXT)], dtype=np.int32)
        inputs = [grpcclient.InferInput("TOKENS", list(ids.shape), "INT32"),
                  grpcclient.InferInput("GT_TEXT", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.array([[TEXT.encode()]], dtype=object))
        assert client.infer("token2wav_asr", inputs).as_numpy("REWARDS").reshape(-1)[0] == pytest.approx(1.0)
    finally:
        client.close()


def _metric(server, name):
    text = requests.get(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics:\n{text[-2000:]}")


def test_binary_and_reference_json_clients_pass_the_guard(server):
    body, header_length = _binary_request()
    response = requests.post(_infer_url(server), data=body, timeout=30,
                             headers={"Inference-Header-Content-Length": str(header_length)})
    assert response.status_code == 200, response.text
    result = httpclient.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers["Inference-Header-Content-Length"]))
    assert result.as_numpy("REWARDS").reshape(-1)[0] == pytest.approx(1.0)
    # tritonclient's own HTTP client (binary protocol, gzip request compression) as well
    client = httpclient.InferenceServerClient(f"{server.host}:{server.http_port}")
    try:
        ids = np.array([text_to_tokens(TEXT)], dtype=np.int32)
        inputs = [httpclient.InferInput("TOKENS", list(ids.shape), "INT32"),
                  httpclient.InferInput("GT_TEXT", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.array([[TEXT.encode()]], dtype=object))
        for compression in (None, "gzip", "deflate"):
            result = client.infer("token2wav_asr", inputs, request_compression_algorithm=compression,
                                  response_compression_algorithm=compression)
            assert result.as_numpy("REWARDS").reshape(-1)[0] == pytest.approx(1.0)
        assert client.is_server_ready() and client.is_model_ready("token2wav_asr")
        assert client.get_model_config("token2wav_asr")["max_batch_size"] == 8
    finally:
        client.close()
    _assert_serves_good_requests(server)


def test_a_request_over_the_item_limit_gets_an_error_naming_the_input(server):
    """HTTP (the guard): 400 naming the input, its shape and the limit; gRPC: Triton's own refusal.
    The server goes on serving."""
    ids = np.array([text_to_tokens(TEXT)] * 9, dtype=np.int32)
    body = {"inputs": [{"name": "TOKENS", "shape": list(ids.shape), "datatype": "INT32", "data": ids.ravel().tolist()},
                       {"name": "GT_TEXT", "shape": [9, 1], "datatype": "BYTES", "data": [TEXT] * 9}]}
    response = requests.post(_infer_url(server), json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"].startswith("input 'TOKENS' has 9 items (the first dimension of its shape [9, 4]): "
                                               "this reward server takes at most 8 items per request")
    client = grpcclient.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    try:
        inputs = [grpcclient.InferInput("TOKENS", list(ids.shape), "INT32"),
                  grpcclient.InferInput("GT_TEXT", [9, 1], "BYTES")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.array([[TEXT.encode()]] * 9, dtype=object))
        with pytest.raises(InferenceServerException, match="batch-size must be <= 8 for 'token2wav_asr'"):
            client.infer("token2wav_asr", inputs)
    finally:
        client.close()
    _assert_serves_good_requests(server)


def _nested_binary():
    header = NESTED_200K
    return header + b"\0" * 16, {"Inference-Header-Content-Length": str(len(header))}


def _truncated_binary():
    body, header_length = _binary_request()
    return body[: header_length + 3], {"Inference-Header-Content-Length": str(header_length)}


# (name, body, extra headers, statuses the client may get): every one is an error answer.
HTTP_CASES = [
    ("small malformed JSON", b'{"inputs": [', {}, {400}),
    ("200 KB of '[' (crashes unguarded Triton)", NESTED_200K, {}, {400}),
    ("1.9 MB of '['", b"[" * (MAX_BODY_MB * 1024 * 1024 - 100_000), {}, {400}),
    ("1 MB malformed numbers", b'{"inputs": [{"data": [' + b"1," * 500_000, {}, {400}),
    ("3 MB malformed JSON (over the limit)", b'{"inputs": [' + b"1," * 1_500_000, {}, {413}),
    ("10 MB of '[' (over the limit)", b"[" * (10 * 1024 * 1024), {}, {413}),
    ("binary garbage", bytes(range(256)) * 64, {}, {400}),
    # Triton answers these itself, some with 500
    ("JSON of the wrong shape", b'{"inputs": 5}', {}, {400, 500}),
    ("wrong datatype", json.dumps({"inputs": [{"name": "TOKENS", "shape": [1, 2], "datatype": "FP32",
                                               "data": [[1.5, 2.5]]}]}).encode(), {}, {400, 500}),
    ("empty body", b"", {}, {400, 500}),  # Triton's own answer to an empty document
    ("gzip of 200 KB of '['", gzip.compress(NESTED_200K), {"Content-Encoding": "gzip"}, {400}),
    ("bad gzip", b"not gzip at all", {"Content-Encoding": "gzip"}, {400}),
    ("binary request with a nested JSON header", *_nested_binary(), {400}),
    ("binary header length past the body", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, {400}),
    ("binary header length not a number", b'{"inputs": []}', {"Inference-Header-Content-Length": "ten"}, {400}),
    ("binary request with truncated tensor bytes", *_truncated_binary(), {400, 500}),
]


@pytest.mark.parametrize("name,body,headers,statuses", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_malformed_http_request_gets_an_error_and_the_server_keeps_serving(server, name, body, headers, statuses):
    response = requests.post(_infer_url(server), data=body, headers=headers, timeout=60)
    assert response.status_code in statuses, (name, response.status_code, response.text[:300])
    assert response.json()["error"]  # Triton's error shape, from the guard or from Triton
    _assert_serves_good_requests(server)


def test_chunked_nested_body_and_bad_requests_on_other_paths(server):
    def chunks():
        for _ in range(20):
            yield b"[" * 10_000

    response = requests.post(_infer_url(server), data=chunks(), timeout=60)  # Transfer-Encoding: chunked
    assert response.status_code == 400 and "nested" in response.json()["error"]
    for path in ("/v2/repository/index", "/v2/models/token2wav_asr/generate", "/v2/logging", "/v2/trace/setting"):
        response = requests.post(server.http_url + path, data=NESTED_200K, timeout=60)
        assert response.status_code == 400, path
    assert requests.post(f"{server.http_url}/v2/models/nobody/infer", json=_reference_payload(),
                         timeout=30).status_code in (400, 404)
    # An item the model refuses is answered in-band (ERRORS), the request itself succeeds.
    response = requests.post(_infer_url(server), json=_reference_payload(ids=[5, 6561]), timeout=30)
    errors = {o["name"]: o["data"] for o in response.json()["outputs"]}["ERRORS"]
    assert "outside [0, 6561)" in errors[0]
    _assert_serves_good_requests(server)


def _raw_exchange(server, data: bytes) -> bytes:
    with socket.create_connection((server.host, server.http_port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_requests_that_are_not_http_get_an_error_answer(server):
    for data in (bytes(range(256)) * 40,  # not HTTP at all
                 b"POST /v2/models/token2wav_asr/infer HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 200_000 + b"\r\n\r\n",
                 b"POST /v2/models/token2wav_asr/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"):
        answer = _raw_exchange(server, data)
        assert answer.startswith(b"HTTP/1.") and answer.split(b" ", 2)[1] == b"400", answer[:200]
    _assert_serves_good_requests(server)
    assert _metric(server, 'token2wav_server_http_requests_total{outcome="bad_http"}') >= 1
    assert "Error handling request" not in server.log()  # counted, not logged with a traceback


def _grpc_inputs(tokens, dtype="INT32", text=TEXT):
    inputs = [grpcclient.InferInput("TOKENS", list(tokens.shape), dtype),
              grpcclient.InferInput("GT_TEXT", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(tokens)
    inputs[1].set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    return inputs


def test_malformed_grpc_requests_get_an_error_and_the_server_keeps_serving(server):
    address = f"{server.host}:{server.grpc_port}"
    client = grpcclient.InferenceServerClient(address)
    try:
        bad = {
            "wrong dtype": lambda: client.infer("token2wav_asr", _grpc_inputs(np.ones((1, 3), np.float32), "FP32")),
            "unknown model": lambda: client.infer("nobody", _grpc_inputs(np.ones((1, 3), np.int32))),
            "batch over --max-batch-size": lambda: client.infer(
                "token2wav_asr", [_grpc_inputs(np.ones((9, 3), np.int32))[0]]),
            "5 MB request over the batch limit": lambda: client.infer(
                "token2wav", [grpcclient.InferInput("TOKENS", [9, 150_000], "INT32").set_data_from_numpy(
                    np.ones((9, 150_000), np.int32))]),
        }
        for name, call in bad.items():
            with pytest.raises(InferenceServerException):
                call()
            _assert_serves_good_requests(server)
        result = client.infer("token2wav_asr", _grpc_inputs(np.array([[5, 6561]], np.int32)))
        assert "outside [0, 6561)" in result.as_numpy("ERRORS").reshape(-1)[0].decode()
    finally:
        client.close()
    # Bytes that are not a ModelInferRequest at all, small and large.
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for garbage in (b"\xff" * 100, bytes(range(256)) * 20_000, b"\x0a" * (5 * 1024 * 1024)):
            with pytest.raises(grpc.RpcError):
                infer(garbage, timeout=60)
            _assert_serves_good_requests(server)


def test_nothing_above_crashed_or_restarted_the_server(server):
    """Run last: a crash would have been hidden by a restart, so count the starts."""
    _assert_serves_good_requests(server)
    assert _metric(server, "token2wav_server_worker_starts_total") == server.starts_at_ready
    assert _metric(server, 'token2wav_server_http_requests_total{outcome="bad_json"}') >= 10
    assert _metric(server, 'token2wav_server_http_requests_total{outcome="too_large"}') >= 2
    assert "nv_inference_request_success" in requests.get(
        f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).text  # Triton's own metrics too


def test_unguarded_triton_dies_on_deeply_nested_json():
    """Why the guard exists: without it, one request ends the server (--no-supervise: for good)."""
    for attempt in range(3):  # with --no-supervise nothing retries a start that fails on a loaded machine
        try:
            unguarded = start_server(extra_args=["--no-http-guard", "--no-supervise"])
            break
        except (RuntimeError, TimeoutError):
            if attempt == 2:
                raise
    try:
        _assert_serves_good_requests(unguarded)
        with pytest.raises(requests.ConnectionError):
            requests.post(_infer_url(unguarded), data=NESTED_200K, timeout=60)
        assert unguarded.process.wait(timeout=120) == 3  # the front's status: Triton died
        assert "Triton stopped without being asked to" in unguarded.log()
    finally:
        unguarded.stop()
