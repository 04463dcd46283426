"""docs/reward_server.md, *Calling the server*: every example there runs against the stand-in
server and answers what the page prints, so the page cannot drift from the server.

An example is a fenced ``bash`` or ``python`` block after ``<!-- example: NAME -->``; its answer
is the fenced block after ``<!-- response: NAME -->`` (a ``json`` block is compared as parsed JSON,
NaN included; any other block line by line). The examples address the default ports
(127.0.0.1:8000 HTTP, 127.0.0.1:8001 gRPC); here they go to the session's server on its own
ports, run in a folder holding ``prompt.wav`` (CosyVoice's ``asset/zero_shot_prompt.wav``, as the
page says), with the trainer environment's python first on PATH."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reward_server.md"
BLOCK = re.compile(r"<!-- (example|response): ([\w-]+) -->\s*```(\w*)\n(.*?)```", re.DOTALL)


def blocks() -> dict:
    found: dict = {}
    for kind, name, language, body in BLOCK.findall(DOC.read_text(encoding="utf-8")):
        assert (kind, name) not in found, f"two {kind} blocks named {name!r} in {DOC.name}"
        found[(kind, name)] = (language, body)
    return found


BLOCKS = blocks()
NAMES = sorted({name for kind, name in BLOCKS if kind == "example"})


def same_json(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return a == b


def test_every_example_has_its_answer_and_the_page_has_them_all():
    assert {name for kind, name in BLOCKS if kind == "response"} == set(NAMES)
    assert {"curl-json", "nan-strict", "binary-prompt", "tritonclient", "config", "item-limit"} <= set(NAMES)
    for name in NAMES:
        assert BLOCKS[("example", name)][0] in ("bash", "python"), name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from ttsrl.cosyvoice_source import find_cosyvoice_source

    folder = tmp_path_factory.mktemp("api_examples")
    shutil.copy(find_cosyvoice_source() / "asset" / "zero_shot_prompt.wav", folder / "prompt.wav")
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_the_documented_example_gives_the_documented_answer(name, reward_server, workdir):
    language, code = BLOCKS[("example", name)]
    expected_language, expected = BLOCKS[("response", name)]
    code = (code.replace("127.0.0.1:8000", f"{reward_server.host}:{reward_server.http_port}")
            .replace("127.0.0.1:8001", f"{reward_server.host}:{reward_server.grpc_port}"))
    command = ["bash", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"example {name!r} failed:\n{done.stdout}\n{done.stderr}"
    if expected_language == "json":
        assert same_json(json.loads(done.stdout), json.loads(expected)), (
            f"example {name!r} answered\n{done.stdout}\nbut the page says\n{expected}")
    else:
        assert done.stdout.rstrip().splitlines() == expected.rstrip().splitlines(), (
            f"example {name!r} printed\n{done.stdout}\nbut the page says\n{expected}")
