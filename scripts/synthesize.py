"""Stage 5: synthesize one text with a policy checkpoint and print the wav path.

    python scripts/synthesize.py --model DIR --output OUT.wav [--text TEXT]
        [--prompt-text TEXT --prompt-tokens 1,2,3] [--server-url URL] [--greedy] [--seed N]

Generation and decoding are infer_dist.py's (the model's chat template, sampling
flags, the reward server's token2wav); the default text is a tongue-twister.
Zero-shot prompting needs the prompt's speech tokens (--prompt-tokens);
--prompt-wav is recorded for reference only in this version.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import infer_dist  # noqa: E402
from ttsrl.speech_tokens import parse_speech_tokens  # noqa: E402

DEFAULT_TEXT = "八百标兵奔北坡，炮兵并排北边跑。炮兵怕把标兵碰，标兵怕碰炮兵炮。"


def synthesize(model: str, output: Path, text: str, server_url: str, sampling: infer_dist.SamplingOptions,
               prompt_text: str = "", prompt_tokens: list[int] | None = None) -> dict:
    """Generate and decode one utterance; returns its record (raises on failure)."""
    import torch

    torch.manual_seed(sampling.seed)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    generator = infer_dist.TransformersGenerator(model, device, sampling)
    utterance = infer_dist.Utterance(output.stem, text, prompt_text=prompt_text, prompt_tokens=prompt_tokens or [])
    parsed = parse_speech_tokens(generator.generate([utterance])[0])
    if not parsed.ids:
        raise RuntimeError("the model generated no speech tokens (try another --seed or check the checkpoint)")
    result = infer_dist.ServerToken2Wav(server_url).synthesize([parsed.ids])[0]
    if isinstance(result, Exception):
        raise RuntimeError(f"token2wav failed: {result}")
    wave, sample_rate = result
    output.parent.mkdir(parents=True, exist_ok=True)
    infer_dist.write_wav_atomically(output, wave, sample_rate)
    return {"wav": str(output), "tokens": len(parsed.ids), "duration": len(wave) / sample_rate, "ended": parsed.ended}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True, help="wav file to write")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--prompt-text", default="")
    parser.add_argument("--prompt-tokens", default="", help="comma-separated speech token ids of the prompt")
    parser.add_argument("--prompt-wav", default="", help="recorded for reference only")
    parser.add_argument("--server-url", default=os.environ.get("REWARD_SERVER_URL", "grpc://127.0.0.1:8001").split(",")[0])
    parser.add_argument("--max-new-tokens", type=int, default=1000)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=25)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        prompt_tokens = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--prompt-tokens must be comma-separated integers, got {args.prompt_tokens!r}")
    if not args.text.strip():
        parser.error("--text is empty")
    sampling = infer_dist.SamplingOptions(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.greedy,
                                          args.seed)
    try:
        record = synthesize(args.model, Path(args.output), args.text, args.server_url, sampling, args.prompt_text,
                            prompt_tokens)
    except (RuntimeError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{record['tokens']} speech tokens, {record['duration']:.2f} s of audio")
    print(record["wav"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
