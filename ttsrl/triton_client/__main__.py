"""``python -m ttsrl.triton_client [--model NAME ...] URL[,URL...]``: exit 0 when every server is
ready and serves every ``--model`` (default: the reward model, which the server loads last), else
name the first that is not and why (exit 1); a bad URL is a usage error (exit 2)."""
from __future__ import annotations

import sys

from .ready import READY_MODEL, readiness_problem
from .wire import parse_urls

USAGE = "usage: python -m ttsrl.triton_client [--model NAME ...] URL[,URL...]"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    models, words = [], []
    while argv:
        word = argv.pop(0)
        if word == "--model":
            if not argv:
                print(f"{USAGE} (--model needs a name)", file=sys.stderr)
                return 2
            models.append(argv.pop(0))
        else:
            words.append(word)
    try:
        urls = [f"{scheme}://{address}" for scheme, address in parse_urls(",".join(words))]
    except ValueError as error:
        print(f"{USAGE} ({error})", file=sys.stderr)
        return 2
    for url in urls:
        for model in models or [READY_MODEL]:
            problem = readiness_problem(url, model=model)
            if problem is not None:
                print(f"reward server at {url} {problem} (start it with 'bash run.sh 1 1')", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
