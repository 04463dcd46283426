"""Run a CLI of scripts/ in this process: scripts/ holds entry points, not a package, so
tests load a script by its path (its module name is scripts_<name>)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (loaded once per session)."""
    module_name = f"scripts_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_script(name: str, argv: list[str]) -> int:
    """``main(argv)`` of scripts/<name>.py."""
    return load_script(name).main(argv)
