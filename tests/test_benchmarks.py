"""Every benchmark runs as its docstring says, from a fresh clone: in the environment it names,
as a script (so only benchmarks/ is on sys.path, no PYTHONPATH), every module it imports,
inside functions too, resolves, and ``--help`` works."""
import os
import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((REPO / "benchmarks").glob("bench_*.py"))
DOCUMENTED = re.compile(r"^\s*(\.venv(?:-server)?)/bin/python (benchmarks/\S+\.py)", re.MULTILINE)

# Runs the benchmark file the way `python benchmarks/X.py` would (sys.path[0] = its folder),
# without calling main, then imports every absolute import the file has, and runs main(--help).
CHECK = r"""
import ast, importlib, os, runpy, sys
path = sys.argv[1]
sys.path[0] = os.path.dirname(os.path.abspath(path))
namespace = runpy.run_path(path, run_name="__benchmark_check__")
tree = ast.parse(open(path, encoding="utf-8").read())
names = set()
for node in ast.walk(tree):
    if isinstance(node, ast.Import):
        names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names.add(node.module)
repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
for name in sorted(names):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        # A helper the script puts on sys.path itself at run time, from a repository folder
        # (bench_flow_batching.py: tests/server/conftest.py): the file must be there.
        relative = name.replace(".", os.sep) + ".py"
        folders = [folder for folder, _, _ in os.walk(os.path.join(repo, "tests"))]
        if not any(os.path.isfile(os.path.join(folder, relative)) for folder in folders):
            raise
try:
    namespace["main"](["--help"])
except SystemExit as stop:
    sys.exit(stop.code)
sys.exit("main(['--help']) returned instead of printing the usage")
"""


def test_every_benchmark_documents_its_command():
    assert BENCHMARKS
    for path in BENCHMARKS:
        commands = DOCUMENTED.findall(path.read_text(encoding="utf-8"))
        assert commands, f"{path.name}: no '.venv[-server]/bin/python benchmarks/...' line in its docstring"
        assert all(script == f"benchmarks/{path.name}" for _, script in commands), (path.name, commands)


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_benchmark_imports_and_prints_its_usage_in_its_documented_environment(path):
    venv, script = DOCUMENTED.findall(path.read_text(encoding="utf-8"))[0]
    python = REPO / venv / "bin" / "python"
    assert python.exists(), f"{python} missing: bash scripts/setup_env.sh {'server' if 'server' in venv else 'trainer'}"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", CHECK, script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{venv}/bin/python {script}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "usage:" in result.stdout


def test_reward_routing_benchmark_runs_at_small_sizes():
    """benchmarks/bench_reward_routing.py end to end at small sizes (one 2-slot stand-in server, so one
    server start; a second per phase): every phase answers every rollout right, and the table has every
    row. No timing asserted."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "benchmarks/bench_reward_routing.py",
                             "--slots", "2", "--clients", "4", "--seconds", "1", "--warmup", "0.5",
                             "--item-delay-ms", "20"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[2:]] == [
        "| round robin", "| least work (ours)", "| least work, independent clients",
        "| ideal: the capacities' sum (" + rows[-1].split("(", 1)[1].split(" | ")[0]]
    assert all(row.split(" | ")[3] == "0" for row in rows[2:5])  # no failed rollout in any phase
