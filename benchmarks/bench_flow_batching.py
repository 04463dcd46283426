"""Serial vs batched CosyVoice2 or CosyVoice3 flow decoding (engine option ``flow_batch=true``).

Builds the real flow module (from the pinned CosyVoice source through hyperpyyaml, random
weights) of ``--family cosyvoice2`` (``CausalMaskedDiffWithXvec``) or ``cosyvoice3``
(``CausalMaskedDiffWithDiT``) at ``--size real`` (CosyVoice2-0.5B: 112.5M parameters;
Fun-CosyVoice3-0.5B's DiT) or ``tiny``, and decodes the same utterances

- serially: CosyVoice's own ``flow.inference`` per item (``decode_flow_one``, what the
  engine does by default);
- batched: the encoder (CosyVoice3: the pre-lookahead layer) per item, then one padded
  classifier-free-guidance batch through the flow decoder's estimator (``decode_flow_batch``;
  CosyVoice3: ``decode_dit_flow_batch``);

and prints seconds, utterances/s, the speed-up and the largest difference between the two
outputs. Prompts are random features of a ``--prompt-tokens``-token prompt; utterance
lengths vary around ``--tokens`` (+-25 %), as in a GRPO batch.

    .venv-server/bin/python benchmarks/bench_flow_batching.py --cosyvoice-src CosyVoice \\
        [--family cosyvoice2|cosyvoice3] [--size real] [--utterances 3] [--tokens 50] [--device cpu|cuda:0] [--fp16]

CosyVoice source: ``--cosyvoice-src``, else ``$cosyvoice_src``, else the pinned tarball in
``../shared/third_party`` unpacked into ``.cache/third_party`` (as the tests do).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_flow(size: str, cosyvoice_src: Path, device: str, workdir: Path):
    """CosyVoice2's flow module at ``size`` with random weights, in eval mode on ``device``."""
    import json

    import torch
    from hyperpyyaml import load_hyperpyyaml

    from ttsrl.cosyvoice_source import add_cosyvoice_to_path
    from ttsrl.policy.hf_conversion import BLANK_EN
    from ttsrl.tiny_models.cosyvoice2 import cosyvoice2_yaml, write_qwen2_weights
    from ttsrl.tiny_models.llm import write_tiny_cosyvoice2

    add_cosyvoice_to_path(cosyvoice_src)
    # The yaml's (always tiny) LLM part is built too: it needs a Qwen2 directory.
    llm_dir = write_tiny_cosyvoice2(workdir / "llm", seed=0)
    write_qwen2_weights(torch.load(llm_dir / "llm.pt", weights_only=True), llm_dir / BLANK_EN)
    hidden = json.loads((llm_dir / BLANK_EN / "config.json").read_text())["hidden_size"]
    configs = load_hyperpyyaml(cosyvoice2_yaml(hidden, size=size), overrides={"qwen_pretrain_path": str(llm_dir / BLANK_EN)})
    return configs["flow"].to(device).eval()


def build_dit_flow(size: str, cosyvoice_src: Path, device: str):
    """CosyVoice3's flow module at ``size`` with random weights, in eval mode on ``device``."""
    from hyperpyyaml import load_hyperpyyaml

    from ttsrl.cosyvoice_source import add_cosyvoice_to_path
    from ttsrl.tiny_models.cosyvoice3_audio import cosyvoice3_yaml

    add_cosyvoice_to_path(cosyvoice_src)
    return load_hyperpyyaml(cosyvoice3_yaml(cosyvoice_src, size=size))["flow"].to(device).eval()


def find_source(given: str | None) -> Path:
    if given:
        return Path(given)
    from ttsrl.cosyvoice_source import find_cosyvoice_source

    return find_cosyvoice_source()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["cosyvoice2", "cosyvoice3"], default="cosyvoice2")
    parser.add_argument("--size", choices=["tiny", "real"], default="real")
    parser.add_argument("--utterances", type=int, default=3, help="utterances per batch")
    parser.add_argument("--tokens", type=int, default=50, help="mean speech tokens per utterance")
    parser.add_argument("--prompt-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each mode (best is reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp16", action="store_true", help="flow under fp16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cosyvoice-src", default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from token2wav_server.engines_cosyvoice2 import fp16_autocast, decode_flow_batch, decode_flow_one, device_scope
    from token2wav_server.engines_cosyvoice3 import decode_dit_flow_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    source = find_source(args.cosyvoice_src)
    with tempfile.TemporaryDirectory(prefix="bench_flow_") as tmp:
        started = time.perf_counter()
        if args.family == "cosyvoice3":
            flow = build_dit_flow(args.size, source, args.device)
        else:
            flow = build_flow(args.size, source, args.device, Path(tmp))
        build_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in flow.parameters())
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    prompt = {"flow_prompt_speech_token": torch.as_tensor(rng.integers(0, 6561, (1, args.prompt_tokens)),
                                                          dtype=torch.int32, device=device),
              "prompt_speech_feat": torch.randn(1, 2 * args.prompt_tokens, 80, generator=generator).to(device),
              "flow_embedding": torch.randn(1, 192, generator=generator).to(device)}
    lengths = [max(1, int(args.tokens * f)) for f in rng.uniform(0.75, 1.25, args.utterances)]
    tokens = [torch.as_tensor(rng.integers(0, 6561, (1, n)), dtype=torch.int32, device=device) for n in lengths]
    prompts = [prompt] * len(tokens)
    decode_batch = decode_dit_flow_batch if args.family == "cosyvoice3" else decode_flow_batch

    def run(mode):
        best, mels = float("inf"), None
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode(), device_scope(device), fp16_autocast(device, args.fp16):
                if mode == "serial":
                    mels = [decode_flow_one(flow, t, p) for t, p in zip(tokens, prompts)]
                else:
                    mels = decode_batch(flow, tokens, prompts)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best, mels

    # Warm-up of both paths on short inputs: the first call of a new batch shape pays one-time
    # costs (about 10 s for the first batched call at tiny size on 2 CPU cores) that a
    # server pays once at start-up, not per request.
    with torch.inference_mode(), device_scope(device), fp16_autocast(device, args.fp16):
        decode_flow_one(flow, tokens[0][:, :5], prompt)
        decode_batch(flow, [t[:, :5] for t in tokens], prompts)
    serial_s, serial = run("serial")
    batched_s, batched = run("batched")
    difference = max(float((a - b).abs().max()) for a, b in zip(serial, batched))
    scale = max(float(a.abs().max()) for a in serial)
    print(f"{args.family} flow {args.size}: {parameters / 1e6:.1f}M parameters (built in {build_s:.1f} s), device {args.device}"
          f"{' fp16' if args.fp16 else ''}, torch threads {torch.get_num_threads()}")
    print(f"{args.utterances} utterances of {lengths} tokens, prompt {args.prompt_tokens} tokens, "
          f"best of {args.repeats}")
    print(f"{'mode':<10} {'seconds':>9} {'utt/s':>8}")
    for mode, seconds in (("serial", serial_s), ("batched", batched_s)):
        print(f"{mode:<10} {seconds:>9.2f} {args.utterances / seconds:>8.3f}")
    print(f"batched / serial throughput: {serial_s / batched_s:.2f}x; "
          f"max |batched - serial| = {difference:.2e} (mel values up to {scale:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
