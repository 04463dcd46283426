"""Reward-path throughput: reference client vs our hook vs in-process floor, in one run.

    .venv/bin/python benchmarks/bench_reward_server.py [--rollouts 1024] [--tokens 300]

Starts a reward server (stand-in engines: zero model cost, real scoring) from the
server environment, then scores the same rollouts three ways:

1. reference: a synchronous ``compute_score`` that sends one JSON HTTP request per
   rollout with ``requests`` (the reference recipe's protocol), called by veRL's naive
   reward manager as veRL calls a sync function (in its default thread pool);
2. ours: ``reward_tts.compute_score`` (async, pooled gRPC, concurrent rollouts coalesced
   into batched requests) through the same veRL reward manager, every rollout in flight
   at once as veRL's reward loop worker does;
3. floor: the server's own pipeline called in-process on the whole batch (token ->
   audio -> ASR -> scoring, no network, no veRL), the least the work can cost here.

It also times veRL's reward manager with a constant score (no server), the share of the
overhead that belongs to veRL itself.

Prints rollouts/s and the per-rollout overhead over the floor. Rollouts are ~``--tokens``
speech tokens at 5 tokens per character (CosyVoice2 speaks ~5 tokens per Chinese
character), half of them with a few wrong characters. Every path gets one untimed
warm-up pass over the same rollouts first. All three share this machine's cores with
the server, so on a small machine the numbers move with its load: compare within a run.
"""
import argparse
import asyncio
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import torch  # noqa: E402

import reward_tts  # noqa: E402
from token2wav_server.engines import EngineOptions, SpeakerPrompt  # noqa: E402
from token2wav_server.launch import start_server  # noqa: E402
from token2wav_server.reward_scoring import load_reward_config  # noqa: E402
from token2wav_server.serving import Limits, Pipeline, Slot  # noqa: E402
from token2wav_server.standin import create_engines, text_to_tokens  # noqa: E402
from ttsrl.speech_tokens import SPEECH_END_TOKENS, all_speech_tokens  # noqa: E402

TOKENS_PER_CHAR = 5
COMMON = "一丁七万丈三上下不与丑专且世丘业东两严丧个中丰串临丹为主丽举久义之乌乎乐乔乘九也习书买乱争事二于云互五井亚些亡交亦产享京亲人亿什仁今介仍从他付代令以仪们件价任份仿企伊伍休众优伙会伟传伤伦估伯伴伸似但位低住体何余佛作你佳使例供依侧便俗保信修倍倒候借值假做健偶停像儿元兄充兆先光克免兑党入全八公六兰共关兴兵其具典养兼内冈册再冒写军农冠冬冰冲决况冷准几凡凭出击函分切刊划列则刚创初别利到制刻前剧力功加务劣动助努劳势勤包化北区医十千升午半华协单南博占卡卫印危即却卷厂历压原去县参又叉及友双反发取受变叙口古句另只叫召可台史右叶号司各合吉同名后向吗否含听启吴告员周味命和咖品哈响哪唐商善喜四回因团园困围固国图圆在地场均坐块坚城基堂增士声处备复夏外多夜大天太夫央失头夹奇奏套女奶她好如妈妹始姐委姓威娘婚子字存孙季学孩宁它宇守安宋完宏官定宜宝实客宣室宫害家容宽富察对寻导寿封射将小少尔尚就尺尼尽局层居屋展属山岁岛岸峰川州工左巧巨差己已巴市布师希带帮常平年并广庄床序库应底店府度座康延建开异式引张强归当录形彩影役彼往征待律很後得御"


def make_rollouts(count: int, tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    chars = max(1, tokens // TOKENS_PER_CHAR)
    rows = []
    for i in range(count):
        text = "".join(COMMON[j] for j in rng.integers(0, len(COMMON), chars))
        said = list(text)
        if i % 2:
            for k in rng.integers(0, chars, 3):
                said[k] = COMMON[rng.integers(len(COMMON))]
        rows.append((text, text_to_tokens("".join(said), TOKENS_PER_CHAR)))
    return rows


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.add_tokens(all_speech_tokens() + list(SPEECH_END_TOKENS))
    return tok


def data_proto(tok, rows):
    from verl import DataProto

    # Speech token <|s_i|> was appended after the 2 base tokens: its id is i + 2.
    responses = [np.asarray(ids) + 2 for _, ids in rows]
    width = max(len(r) for r in responses)
    response_tensor = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), 1 + width), dtype=torch.long)
    mask[:, 0] = 1
    for i, ids in enumerate(responses):
        response_tensor[i, : len(ids)] = torch.as_tensor(ids)
        mask[i, 1: 1 + len(ids)] = 1
    return DataProto.from_dict(
        tensors={"prompts": torch.ones((len(rows), 1), dtype=torch.long), "responses": response_tensor,
                 "attention_mask": mask},
        non_tensors={"data_source": np.array(["tts"] * len(rows), dtype=object),
                     "reward_model": np.array([{"ground_truth": t} for t, _ in rows], dtype=object),
                     "extra_info": np.array([{} for _ in rows], dtype=object)},
    )


_SESSION = requests.Session()
REFERENCE_URL = None


def reference_compute_score(data_source, solution_str, ground_truth, extra_info=None, **_):
    """The reference recipe's protocol: parse ids, one blocking JSON POST, reward = outputs[0]."""
    import re

    ids = [int(x) for x in re.findall(r"<\|s_(\d+)\|>", solution_str)]
    payload = {"inputs": [
        {"name": "TOKENS", "shape": [1, len(ids)], "datatype": "INT32", "data": [ids]},
        {"name": "TOKEN_LENS", "shape": [1, 1], "datatype": "INT32", "data": [[len(ids)]]},
        {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [ground_truth]},
    ]}
    response = requests.post(REFERENCE_URL, json=payload, timeout=200)
    response.raise_for_status()
    return float(response.json()["outputs"][0]["data"][0])


async def constant_compute_score(data_source, solution_str, ground_truth, extra_info=None, **_):
    """No scoring at all: what veRL's reward manager itself costs per rollout."""
    return {"score": 0.0}


def run_manager(compute_score, tok, data):
    from omegaconf import OmegaConf

    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        manager = get_reward_manager_cls("naive")(OmegaConf.create({}), tok, compute_score)
        # Warm-up pass (connections, start-up health check, the server's scoring caches)
        # outside the timing, so every path is timed warm.
        loop.run_until_complete(asyncio.gather(*(manager.run_single(data[i: i + 1]) for i in range(len(data)))))
        start = time.perf_counter()
        outputs = loop.run_until_complete(asyncio.gather(*(manager.run_single(data[i: i + 1])
                                                           for i in range(len(data)))))
        elapsed = time.perf_counter() - start
        loop.run_until_complete(reward_tts.close_clients())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return elapsed, [o["reward_score"] for o in outputs]


def floor(rows):
    engines = create_engines(EngineOptions(extra={"tokens_per_char": str(TOKENS_PER_CHAR)}))
    prompt = SpeakerPrompt("silence", np.zeros(16000, dtype=np.float32), 16000, "")
    pipeline = Pipeline(Slot(engines, [prompt]), load_reward_config(str(ROOT / "configs/reward.yaml")), Limits())
    width = max(len(ids) for _, ids in rows)
    tokens = np.zeros((len(rows), width), dtype=np.int32)
    for i, (_, ids) in enumerate(rows):
        tokens[i, : len(ids)] = ids
    request = {"TOKENS": tokens, "TOKEN_LENS": np.array([[len(ids)] for _, ids in rows], dtype=np.int32),
               "GT_TEXT": np.array([[t.encode()] for t, _ in rows], dtype=object)}
    pipeline.token2wav_asr([request])  # warm-up pass: scoring caches, as for the other paths
    start = time.perf_counter()
    out = pipeline.token2wav_asr([request])[0]
    return time.perf_counter() - start, out["REWARDS"].ravel().tolist()


def main(argv=None) -> int:
    global REFERENCE_URL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--instances", type=int, default=1, help="server instances (--instances-per-device)")
    parser.add_argument("--max-batch-size", type=int, default=128)
    args = parser.parse_args(argv)

    rows = make_rollouts(args.rollouts, args.tokens)
    tok = tokenizer()
    data = data_proto(tok, rows)
    floor_s, floor_scores = floor(rows)
    verl_s, _ = run_manager(constant_compute_score, tok, data)
    with start_server(extra_args=["--engine-option", f"tokens_per_char={TOKENS_PER_CHAR}",
                                  "--instances-per-device", str(args.instances),
                                  "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-us", "2000"]) as server:
        REFERENCE_URL = f"{server.http_url}/v2/models/token2wav_asr/infer"
        os.environ["REWARD_SERVER_URL"] = server.grpc_url
        ours_s, ours_scores = run_manager(reward_tts.compute_score, tok, data)
        ref_s, ref_scores = run_manager(reference_compute_score, tok, data)
    assert np.allclose(ours_scores, floor_scores, atol=1e-6), "our scores differ from the in-process scores"
    assert np.allclose(ref_scores, floor_scores, atol=1e-6), "reference scores differ from the in-process scores"

    n = args.rollouts
    print(f"{n} rollouts x {args.tokens} speech tokens, stand-in engines, {os.cpu_count()} CPU cores, "
          f"{args.instances} server instance(s)")
    print(f"{'path':<46} {'seconds':>8} {'rollouts/s':>11} {'ms/rollout':>11} {'overhead ms':>12}")
    for name, seconds in (("reference: sync requests JSON via veRL naive", ref_s),
                          ("ours: reward_tts async gRPC via veRL naive", ours_s),
                          ("floor: in-process pipeline, one batch", floor_s)):
        overhead = (seconds - floor_s) / n * 1000
        print(f"{name:<46} {seconds:8.2f} {n / seconds:11.1f} {seconds / n * 1000:11.3f} {overhead:12.3f}")
    print(f"ours / reference throughput: {ref_s / ours_s:.1f}x; floor / reference: {ref_s / floor_s:.1f}x")
    print(f"veRL naive reward manager alone (constant score): {verl_s:.2f} s, {verl_s / n * 1000:.3f} ms/rollout "
          "(paid by both veRL paths, included in their overhead)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
