"""How a slot decodes speech tokens: the effective fp16, flow batching, JIT and TensorRT settings
of one device, from what the command line asked (``--fp16/--no-fp16``, ``--flow-batch/--no-flow-batch``,
``--load-jit``, ``--load-trt``; None: auto).

Defaults: on CUDA, fp16 and batched flow decoding (the flow is the costly part of a reward, and
the GPU decodes a padded batch at once); on the CPU neither (no fp16 kernels worth having, and
one item at a time was as fast or faster there: docs/reward_server.md, *Benchmark*). JIT and
TensorRT are options (they need exported files; ``--load-trt`` builds its plan on first use).

What "fp16" means follows upstream CosyVoice exactly (``cosyvoice/cli/model.py`` at the pinned
commit): the weights stay fp32 and the flow runs under ``torch.cuda.amp.autocast`` (mixed
precision). HiFT: CosyVoice2 runs it in fp32, outside autocast (``CosyVoice2Model.token2wav``);
CosyVoice3 runs it under the same autocast (``CosyVoice3Model.token2wav``), its f0 predictor in
float64, which autocast leaves alone. With ``--load-jit`` the flow encoder is
``flow.encoder.fp16.zip`` or ``fp32.zip`` as fp16 says; with ``--load-trt`` the TensorRT plan's
inputs and outputs are fp16 or fp32 as fp16 says. The engines log which they run.

What a CPU forces: fp16, JIT and TensorRT off (a warning says so; upstream turns them off on a
machine without CUDA too). TensorRT's estimator takes one classifier-free-guidance pair (batch 2)
only, so batched flow decoding is off with ``--load-trt`` (asking for both is an error).
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    device: str
    fp16: bool
    flow_batch: bool
    load_jit: bool
    load_trt: bool
    notes: tuple = ()  # why a setting differs from what was asked

    def describe(self) -> str:
        on = lambda value: "on" if value else "off"  # noqa: E731
        text = (f"{self.device}: fp16 {on(self.fp16)}, flow_batch {on(self.flow_batch)}, "
                f"load_jit {on(self.load_jit)}, load_trt {on(self.load_trt)}")
        return text + "".join(f" ({note})" for note in self.notes)


def resolve(device: str, fp16: Optional[bool] = None, flow_batch: Optional[bool] = None, load_jit: bool = False,
            load_trt: bool = False) -> DecodeSettings:
    """The effective settings of a slot on ``device`` ("cpu" or "cuda:N"); None: the device's default."""
    cuda = device.startswith("cuda")
    notes = []
    if load_trt and flow_batch:
        raise ValueError("--load-trt and --flow-batch (flow_batch=true) together: CosyVoice's TensorRT flow "
                         "estimator takes one classifier-free-guidance pair (batch 2) only; drop one of them")
    if not cuda:
        for name, asked in (("fp16", fp16), ("load_jit", load_jit), ("load_trt", load_trt)):
            if asked:
                notes.append(f"{name} needs CUDA: off on {device}")
        return DecodeSettings(device, False, bool(flow_batch), False, False, tuple(notes))
    if flow_batch is None and load_trt:
        notes.append("flow_batch off: the TensorRT estimator takes batch 2 only")
    return DecodeSettings(device, True if fp16 is None else fp16, (not load_trt) if flow_batch is None else flow_batch,
                          load_jit, load_trt, tuple(notes))
