"""Stage 5: synthesize one text with a policy checkpoint and print the wav path.

    python scripts/synthesize.py --model DIR --output OUT.wav [--text TEXT]
        [--prompt-text TEXT --prompt-tokens 1,2,3] [--server-url URL] [--greedy] [--seed N]

Generation and decoding are stage 4's (ttsrl.evaluation.synthesis: upstream CosyVoice's LLM input,
ttsrl.frontend; the recipe's sampling within upstream's length bounds; the reward server's token2wav); the default text is a
tongue-twister. Zero-shot prompting needs the prompt's speech tokens (--prompt-tokens);
--prompt-wav is recorded for reference only in this version.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttsrl.evaluation.synthesis import synthesize_text  # noqa: E402
from ttsrl.sampling import add_sampling_arguments, options_from_args  # noqa: E402
from ttsrl.triton_client.wire import env_server_url  # noqa: E402

DEFAULT_TEXT = "八百标兵奔北坡，炮兵并排北边跑。炮兵怕把标兵碰，标兵怕碰炮兵炮。"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True, help="wav file to write")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--prompt-text", default="")
    parser.add_argument("--prompt-tokens", default="", help="comma-separated speech token ids of the prompt")
    parser.add_argument("--prompt-wav", default="", help="recorded for reference only")
    parser.add_argument("--server-url", default=env_server_url(first=True))
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        prompt_tokens = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--prompt-tokens must be comma-separated integers, got {args.prompt_tokens!r}")
    if not args.text.strip():
        parser.error("--text is empty")
    try:
        record = synthesize_text(args.model, Path(args.output), args.text, args.server_url, options_from_args(args),
                                 args.prompt_text, prompt_tokens)
    except (RuntimeError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{record['tokens']} speech tokens, {record['duration']:.2f} s of audio")
    print(record["wav"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
