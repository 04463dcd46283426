"""The recipe's veRL plugins, loaded in every veRL process by ``VERL_USE_EXTERNAL_MODULES=verl_plugins``.

``import verl`` imports the modules that variable names (``verl.utils.import_utils.import_external_libs``);
``scripts/train_grpo.sh`` sets it for every Ray worker. Importing this package under veRL:

- registers the trainer mode ``tts_sync`` (``verl_plugins.tts_trainer``: veRL's synchronous GRPO
  trainer plus per-step reward-component metrics and listenable validation audio) once veRL's
  trainer package is imported, so processes that never train (rollout, reward workers) do not load it;
- with ``VERL_PLATFORM=cpu``, activates the CPU platform and its shims (``verl_plugins.cpu``).

No file of veRL or vLLM is edited; everything goes through veRL's registries
(``PlatformRegistry.register``, ``register_trainer``).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from types import ModuleType
from typing import Callable


class _RunAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after module ``name`` is executed, in whichever process imports it."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        real_loader, callback = spec.loader, self.callback

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real_loader.create_module(spec)

            def exec_module(self, module):
                real_loader.exec_module(module)
                callback(module)

        spec.loader = Loader()
        return spec


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """``callback(module)`` now if ``name`` is imported already, else right after it is."""
    if name in sys.modules and getattr(sys.modules[name], "__spec__", None) is not None \
            and not getattr(sys.modules[name].__spec__, "_initializing", False):
        callback(sys.modules[name])
        return
    if not any(isinstance(f, _RunAfterImport) and f.name == name and f.callback is callback for f in sys.meta_path):
        sys.meta_path.insert(0, _RunAfterImport(name, callback))


def _register_trainer(_module: ModuleType) -> None:
    from verl_plugins import tts_trainer
    tts_trainer.register()


def running_on_cpu() -> bool:
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


if "verl" in sys.modules:  # loaded by veRL itself (VERL_USE_EXTERNAL_MODULES)
    if running_on_cpu():
        from verl_plugins import cpu
        cpu.activate()
    after_import("verl.trainer.ppo.v1", _register_trainer)
