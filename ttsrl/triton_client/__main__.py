"""``python -m ttsrl.triton_client URL[,URL...]``: exit 0 when every server is ready, else
name the first that is not (exit 1); a bad URL is a usage error (exit 2)."""
from __future__ import annotations

import sys

from .ready import server_ready
from .wire import parse_urls


def main(argv=None) -> int:
    try:
        urls = [f"{scheme}://{address}" for scheme, address in parse_urls(",".join(argv if argv is not None
                                                                                    else sys.argv[1:]))]
    except ValueError as error:
        print(f"usage: python -m ttsrl.triton_client URL[,URL...] ({error})", file=sys.stderr)
        return 2
    for url in urls:
        if not server_ready(url):
            print(f"reward server at {url} is not answering (start it with 'bash run.sh 1 1')", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
