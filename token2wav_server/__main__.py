"""``python -m token2wav_server [options]``: the reward server (see token2wav_server/cli.py and
docs/reward_server.md)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
