"""Load on the reward server: N concurrent clients x M requests, mixed good and bad, over gRPC and HTTP.

    .venv/bin/python benchmarks/bench_load.py [--clients 32] [--requests 20] [--bad-fraction 0.25]

Starts a reward server on loopback (stand-in engines unless --engines; its own free ports,
HTTP body limit 1 MiB so oversized bodies are cheap to send) and runs one phase per
protocol: every client thread sends its M requests back to back. A good request scores a
rollout whose true error rate is known (stand-in engines) and must get it; a bad one
(malformed or deeply nested JSON, an oversized body, garbage bytes, wrong dtype, unknown
model, too big a batch, an out-of-range token) must get an error answer. Anything else
(no answer, a wrong score, a bad request that succeeds) is a failure. Afterwards the server
must still be the same process (no crash hidden by a restart).

Then the reference: the same good-only HTTP traffic against Triton's own HTTP port
(--no-http-guard, which the bad requests above would crash) and through the guard, both
servers up at once and phases alternated (twice each), as a ratio (the guard's cost).
Prints a table per phase. Every target is a loopback server this script starts; every
loop is bounded.
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import random
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXTS = ["一丁七万", "三上下丈", "七万三上丁", "丈三一丁七上", "下丈七", "上下一丁万七三"]
BODY_LIMIT_MB = 1
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Tally:
    good_ok: int = 0
    bad_refused: int = 0
    failures: list = field(default_factory=list)
    good_latency: list = field(default_factory=list)
    bad_latency: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, good: bool, ok: bool, seconds: float, what: str) -> None:
        with self.lock:
            (self.good_latency if good else self.bad_latency).append(seconds)
            if not ok:
                self.failures.append(what)
            elif good:
                self.good_ok += 1
            else:
                self.bad_refused += 1


def _rollout(rng: random.Random):
    """(ground truth, token ids the rollout says, expected error rate)."""
    from token2wav_server.standin import text_to_tokens

    text = rng.choice(TEXTS)
    said = text if rng.random() < 0.5 else text[:-1] + ("万" if text[-1] != "万" else "丁")
    return text, text_to_tokens(said), 0.0 if said == text else 1 / len(text)


def _triton_inputs(protocol, ids, text, dtype="int32"):
    """One rollout as TOKENS and GT_TEXT only (the server derives TOKEN_LENS); dtype float32 is a bad request."""
    import numpy as np

    from ttsrl.triton_client.wire import infer_request, text_column

    inputs, _ = infer_request(protocol, {"TOKENS": np.array([ids], dtype=dtype), "GT_TEXT": text_column([text])}, [])
    return inputs


def _reference_json(ids, text):
    return {"inputs": [{"name": "TOKENS", "shape": [1, len(ids)], "datatype": "INT32", "data": [ids]},
                       {"name": "TOKEN_LENS", "shape": [1, 1], "datatype": "INT32", "data": [[len(ids)]]},
                       {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}


def _http_bad_requests(infer_url: str):
    """name -> callable(session) returning True when the answer is an error answer."""
    nested = b"[" * 200_000
    too_big = b'{"inputs": [' + b"1," * (BODY_LIMIT_MB * 1024 * 1024)

    def post(body, headers=None, url=infer_url):
        return lambda s: s.post(url, data=body, headers=headers or {}, timeout=REQUEST_TIMEOUT_S).status_code >= 400

    def item_error(s):
        response = s.post(infer_url, json=_reference_json([5, 6561], "一丁"), timeout=REQUEST_TIMEOUT_S)
        outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
        return "outside [0, 6561)" in outputs["ERRORS"][0]

    return {
        "malformed JSON": post(b'{"inputs": ['),
        "200 KB nested JSON": post(nested),
        "gzip nested JSON": post(gzip.compress(nested), {"Content-Encoding": "gzip"}),
        "body over the limit": post(too_big),
        "garbage bytes": post(bytes(range(256)) * 16),
        "wrong dtype": post(json.dumps({"inputs": [{"name": "TOKENS", "shape": [1, 1], "datatype": "FP32",
                                                    "data": [[1.5]]}]}).encode()),
        "unknown model": post(b'{"inputs": []}', url=infer_url.replace("token2wav_asr", "nobody")),
        "token out of range": item_error,
    }


def _grpc_bad_requests(address: str):
    import grpc
    import numpy as np
    import tritonclient.grpc as grpcclient

    from ttsrl.triton_client.wire import infer_request

    def raises(call):
        try:
            call()
        except (grpcclient.InferenceServerException, grpc.RpcError):
            return True
        return False

    def item_error(client):
        result = client.infer("token2wav_asr", _triton_inputs("grpc", [5, 6561], "一丁"),
                              client_timeout=REQUEST_TIMEOUT_S)
        return "outside [0, 6561)" in result.as_numpy("ERRORS").reshape(-1)[0].decode()

    def garbage(_client):
        with grpc.insecure_channel(address) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            return raises(lambda: infer(bytes(range(256)) * 64, timeout=REQUEST_TIMEOUT_S))

    def oversized_batch(client):
        inputs, _ = infer_request("grpc", {"TOKENS": np.ones((65, 4), np.int32)}, [])
        return raises(lambda: client.infer("token2wav_asr", inputs, client_timeout=REQUEST_TIMEOUT_S))

    return {
        "wrong dtype": lambda c: raises(lambda: c.infer(
            "token2wav_asr", _triton_inputs("grpc", [1, 2], "一", "float32"), client_timeout=REQUEST_TIMEOUT_S)),
        "unknown model": lambda c: raises(lambda: c.infer("nobody", _triton_inputs("grpc", [1], "一"),
                                                          client_timeout=REQUEST_TIMEOUT_S)),
        "batch over the limit": oversized_batch,
        "garbage bytes": garbage,
        "token out of range": item_error,
    }


def _good_grpc(client, rng):
    text, ids, expected = _rollout(rng)
    result = client.infer("token2wav_asr", _triton_inputs("grpc", ids, text), client_timeout=REQUEST_TIMEOUT_S)
    return abs(float(result.as_numpy("ERROR_RATE").reshape(-1)[0]) - expected) < 1e-6


def _good_http(client, session, infer_url, rng, index):
    """Alternately tritonclient's binary protocol and the reference recipe's JSON request."""
    text, ids, expected = _rollout(rng)
    if index % 2:
        response = session.post(infer_url, json=_reference_json(ids, text), timeout=REQUEST_TIMEOUT_S)
        outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
        return response.status_code == 200 and abs(outputs["ERROR_RATE"][0] - expected) < 1e-6
    result = client.infer("token2wav_asr", _triton_inputs("http", ids, text))
    return abs(float(result.as_numpy("ERROR_RATE").reshape(-1)[0]) - expected) < 1e-6


def run_phase(server, protocol: str, clients: int, requests_each: int, bad_fraction: float, seed: int) -> tuple:
    """Every client thread sends ``requests_each`` requests; returns (tally, wall seconds)."""
    import requests
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    tally = Tally()
    infer_url = f"{server.http_url}/v2/models/token2wav_asr/infer"
    grpc_address = f"{server.host}:{server.grpc_port}"
    bad = _grpc_bad_requests(grpc_address) if protocol == "grpc" else _http_bad_requests(infer_url)
    bad_names = sorted(bad)
    barrier = threading.Barrier(clients + 1)

    def client_thread(index: int):
        rng = random.Random(seed * 1000 + index)
        if protocol == "grpc":
            client, session = grpcclient.InferenceServerClient(grpc_address), None
        else:
            client = httpclient.InferenceServerClient(f"{server.host}:{server.http_port}",
                                                      network_timeout=REQUEST_TIMEOUT_S)
            session = requests.Session()
        barrier.wait()
        try:
            for number in range(requests_each):
                good = rng.random() >= bad_fraction
                name = "good" if good else bad_names[(index + number) % len(bad_names)]
                start = time.perf_counter()
                try:
                    if good:
                        ok = (_good_grpc(client, rng) if protocol == "grpc"
                              else _good_http(client, session, infer_url, rng, index + number))
                    else:
                        ok = bad[name](client if protocol == "grpc" else session)
                except Exception as error:  # no answer at all: a failure, whatever the request
                    ok, name = False, f"{name}: {type(error).__name__}: {str(error)[:120]}"
                tally.add(good, ok, time.perf_counter() - start, name)
        finally:
            client.close()
            if session is not None:
                session.close()

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return tally, time.perf_counter() - start


def _percentile(values: list, q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def print_table(rows: list) -> None:
    header = (f"{'phase':<34} {'requests':>8} {'good ok':>8} {'bad refused':>11} {'failures':>8} {'req/s':>8} "
              f"{'good p50 ms':>11} {'good p99 ms':>11} {'bad p50 ms':>10} {'bad p99 ms':>10}")
    print(header)
    print("-" * len(header))
    for name, tally, seconds in rows:
        total = len(tally.good_latency) + len(tally.bad_latency)
        ms = [1000 * _percentile(v, q) for v, q in ((tally.good_latency, 50), (tally.good_latency, 99),
                                                      (tally.bad_latency, 50), (tally.bad_latency, 99))]
        print(f"{name:<34} {total:>8} {tally.good_ok:>8} {tally.bad_refused:>11} {len(tally.failures):>8} "
              f"{total / seconds:>8.1f} {ms[0]:>11.1f} {ms[1]:>11.1f} {ms[2]:>10.1f} {ms[3]:>10.1f}")


def _starts(server) -> str:
    import requests

    for line in requests.get(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).text.splitlines():
        if line.startswith("token2wav_server_worker_starts_total "):
            return line.split()[1]
    return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients per phase")
    parser.add_argument("--requests", type=int, default=20, help="requests per client per phase")
    parser.add_argument("--bad-fraction", type=float, default=0.25, help="share of malformed requests")
    parser.add_argument("--engines", default="token2wav_server.standin:create_engines")
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--server-args", default="--engine-option delay_ms=5 --max-batch-size 64",
                        help="extra python -m token2wav_server flags")
    parser.add_argument("--no-compare", action="store_true", help="skip the guarded vs unguarded HTTP comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or not 0 <= args.bad_fraction <= 1:
        parser.error("--clients and --requests must be >= 1, --bad-fraction in [0, 1]")

    from token2wav_server.launch import start_server

    extra = shlex.split(args.server_args)
    rows, failures = [], []
    print(f"{args.clients} clients x {args.requests} requests per phase, {args.bad_fraction:.0%} bad; engines "
          f"{args.engines} on {args.devices}", flush=True)
    with start_server(engines=args.engines, devices=args.devices, host="127.0.0.1",
                      extra_args=["--http-max-body-mb", str(BODY_LIMIT_MB), *extra]) as server:
        # A start that failed under load (and was retried) counts too: compare before and after.
        starts_before = _starts(server)
        for protocol in ("grpc", "http"):
            tally, seconds = run_phase(server, protocol, args.clients, args.requests, args.bad_fraction, args.seed)
            rows.append((f"{protocol}, mixed (guarded server)", tally, seconds))
            failures += [f"{protocol}: {what}" for what in tally.failures]
        starts_after = _starts(server)
        if not args.no_compare:
            # Both servers up at once, phases alternated, so a machine's load drift hits both alike.
            with start_server(engines=args.engines, devices=args.devices, host="127.0.0.1",
                              extra_args=["--no-http-guard", *extra]) as direct_server:
                guarded, direct, guarded_s, direct_s = Tally(), Tally(), 0.0, 0.0
                for round_ in range(2):
                    for target, pooled in ((server, guarded), (direct_server, direct)):
                        tally, seconds = run_phase(target, "http", args.clients, args.requests, 0.0,
                                                   args.seed + 1 + round_)
                        pooled.good_ok += tally.good_ok
                        pooled.good_latency += tally.good_latency
                        pooled.failures += tally.failures
                        if pooled is guarded:
                            guarded_s += seconds
                        else:
                            direct_s += seconds
            rows.append(("http, good only, through the guard", guarded, guarded_s))
            rows.append(("http, good only, Triton directly", direct, direct_s))
            failures += [f"comparison: {what}" for what in guarded.failures + direct.failures]
    print()
    print_table(rows)
    print(f"\nTriton worker starts before / after the mixed phases: {starts_before} / {starts_after} "
          "(equal: nothing crashed)")
    if not args.no_compare:
        ratio = (statistics.median(guarded.good_latency) / statistics.median(direct.good_latency))
        print(f"guard cost: good HTTP p50 latency x{ratio:.2f}, throughput x"
              f"{(len(guarded.good_latency) / guarded_s) / (len(direct.good_latency) / direct_s):.2f} "
              "of Triton's own port (which the bad requests would crash)")
    for what in failures[:20]:
        print(f"FAILURE {what}")
    return 1 if failures or starts_after != starts_before else 0


if __name__ == "__main__":
    sys.exit(main())
