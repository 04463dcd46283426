"""Load-aware routing vs round robin over reward servers of different sizes, in one run.

    .venv/bin/python benchmarks/bench_reward_routing.py [--slots 1,2,4] [--clients 32] [--seconds 20] \\
        [--item-delay-ms 100] [--max-batch-size 1]

Starts one reward server per ``--slots`` entry (stand-in engines; that many model instances,
``--instances-per-device``; token2wav costs ``--item-delay-ms`` per item, so a server serves at
most slots x 1000 / item_delay_ms items/s, and ``--max-batch-size`` items per model call), then
runs ``--clients`` concurrent clients, each scoring one rollout after another through
``ttsrl.triton_client.RewardClient`` (the reward hook's client) for ``--seconds`` after a
warm-up, phase by phase:

- *capacity*: each server alone, saturated by all the clients; the **ideal** is the sum of
  these measured capacities (the nominal slots x 1000 / item_delay_ms is shown beside it);
- *round robin*: all servers, ``routing=round_robin`` (the hook's rule before load-aware routing);
- *least work*: all servers, ``routing=least_work`` (the default), the clients sharing one
  pooled client, as the rollouts of one veRL reward-loop worker do;
- *least work, independent*: the same, each client with a client (and routing state) of its
  own, as many worker processes with one request out each.

Every answer is checked (the stand-in's reward for the rollout is 1.0); a wrong or failed
answer is counted as a failure. The table gives items/s, the share of the ideal and how the
items were spread over the servers (from each server's Triton metrics). Goal: least work at
>= 90 % of the ideal. Everything shares this machine's cores, so on a small machine the
figures move with its load; compare within a run.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import re
import sys
import threading
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from token2wav_server.launch import start_server  # noqa: E402
from token2wav_server.standin import text_to_tokens  # noqa: E402
from ttsrl.triton_client import RewardClient, RewardSettings, parse_urls  # noqa: E402

TEXT = "一丁七万"


def items_served(server, model: str = "token2wav_asr") -> int:
    """Items (not requests) ``model`` has run so far, from the server's Triton metrics."""
    url = f"http://{server.host}:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    match = re.search(r'nv_inference_count\{model="' + re.escape(model) + r'",version="1"\} (\d+)', body)
    return int(match.group(1)) if match else 0


async def run_phase(urls: list[str], routing: str, clients: int, seconds: float, warmup: float,
                    independent: bool) -> dict:
    """``clients`` concurrent scorers for ``warmup`` + ``seconds``; completions counted in the window."""
    settings = RewardSettings(urls=parse_urls(",".join(urls)), routing=routing, batch_window_ms=0.0,
                              retry_budget_s=60.0)
    pools = [RewardClient(settings) for _ in range(clients if independent else 1)]
    for pool in pools:
        await pool.ensure_ready()
    tokens = np.asarray(text_to_tokens(TEXT), dtype=np.int64)
    start = time.monotonic()
    window = (start + warmup, start + warmup + seconds)
    counted = [0]
    failures = [0]

    async def client(index: int) -> None:
        pool = pools[index % len(pools)]
        while time.monotonic() < window[1]:
            try:
                result = await pool.score(tokens, TEXT)
                ok = result["REWARDS"] == 1.0
            except Exception:  # noqa: BLE001 - a failure is counted, the phase goes on
                ok = False
            now = time.monotonic()
            if window[0] <= now <= window[1]:
                counted[0] += ok
                failures[0] += not ok

    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        for pool in pools:
            await pool.close()
    return {"items_per_s": counted[0] / seconds, "failures": failures[0]}


def start_servers(slots: list[int], item_delay_ms: float, max_batch_size: int) -> list:
    """One stand-in server per entry of ``slots``, started in parallel."""
    servers: list = [None] * len(slots)
    errors: list = []

    def start(index: int, count: int) -> None:
        try:
            servers[index] = start_server(extra_args=[
                "--instances-per-device", str(count), "--models", "training",
                "--engine-option", f"item_delay_ms={item_delay_ms:g}",
                "--max-batch-size", str(max_batch_size), "--max-queue-delay-us", "0"], timeout=600)
        except Exception as error:  # noqa: BLE001 - reported after every start has ended
            errors.append(error)

    threads = [threading.Thread(target=start, args=(i, n)) for i, n in enumerate(slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for server in servers:
            if server is not None:
                server.stop()
        raise errors[0]
    return servers


def measure(servers: list, slots: list[int], args) -> list[dict]:
    """Every phase of the module doc: rows of name, items/s, failures, share per server."""
    rows = []

    def phase(name: str, chosen: list, routing: str, independent: bool = False) -> dict:
        before = [items_served(s) for s in servers]
        result = asyncio.run(run_phase([s.grpc_url for s in chosen], routing, args.clients, args.seconds,
                                       args.warmup, independent))
        spread = [items_served(s) - b for s, b in zip(servers, before)]
        total = sum(spread) or 1
        row = {"phase": name, **result, "share": [n / total for n in spread]}
        rows.append(row)
        print(f"  {name}: {row['items_per_s']:.1f} items/s, {row['failures']} failure(s)", flush=True)
        return row

    for server, count in zip(servers, slots):
        phase(f"capacity of the {count}-slot server alone", [server], "least_work")
    phase("round robin", servers, "round_robin")
    phase("least work (ours)", servers, "least_work")
    phase("least work, independent clients", servers, "least_work", independent=True)
    return rows


def table(rows: list[dict], slots: list[int], args) -> str:
    capacities = [r["items_per_s"] for r in rows[:len(slots)]]
    ideal = sum(capacities)
    nominal = sum(slots) * 1000.0 / args.item_delay_ms
    header = "| phase | items/s | % of ideal | failures | " + " | ".join(f"{n}-slot share" for n in slots) + " |"
    lines = [f"{len(slots)} servers with {', '.join(map(str, slots))} slot(s), {args.item_delay_ms:g} ms per item, "
             f"{args.clients} concurrent clients, {args.seconds:g} s per phase", "",
             header, "|" + " --- |" * (4 + len(slots))]
    for row in rows[len(slots):]:
        shares = " | ".join(f"{s:.0%}" for s in row["share"])
        lines.append(f"| {row['phase']} | {row['items_per_s']:.1f} | {row['items_per_s'] / ideal:.0%} | "
                     f"{row['failures']} | {shares} |")
    ideal_shares = " | ".join(f"{c / ideal:.0%}" for c in capacities)
    lines.append(f"| ideal: the capacities' sum ({' + '.join(f'{c:.1f}' for c in capacities)}; nominal "
                 f"{nominal:.1f}) | {ideal:.1f} | 100% | | {ideal_shares} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--slots", default="1,2,4", help="slots of each server, comma separated")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each phase's window")
    parser.add_argument("--item-delay-ms", type=float, default=100.0, help="token2wav cost per item on a slot")
    parser.add_argument("--max-batch-size", type=int, default=1,
                        help="items per model call (1: a slot runs one item at a time, so capacity = slots)")
    args = parser.parse_args(argv)
    slots = [int(n) for n in args.slots.split(",") if n.strip()]
    if not slots or min(slots) < 1 or args.clients < 1 or args.seconds <= 0 or args.item_delay_ms <= 0:
        parser.error("--slots needs positive counts; --clients, --seconds and --item-delay-ms must be positive")
    print(f"starting {len(slots)} stand-in servers ({args.slots} slots)...", flush=True)
    servers = start_servers(slots, args.item_delay_ms, args.max_batch_size)
    try:
        rows = measure(servers, slots, args)
    finally:
        for server in servers:
            server.stop()
    print()
    print(table(rows, slots, args))
    return 1 if any(row["failures"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
