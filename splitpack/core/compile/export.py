"""Self-contained artifacts of a split-pack model at one input size: TorchScript or an ExportedProgram.

The artifact is the recorded straight-line program (:func:`splitpack.core.compile.recording.record`):
aten calls in the interpreter's order, the model's weights as its constants, the batch
size free. Loading it needs torch only -- ``torch.jit.load(file)`` or
``torch.export.load(file).module()`` -- not splitpack, not timm, not the model's code.

* ``torchscript``: ``torch.jit.script`` of the program with each aten overload called
  through its overload packet (TorchScript resolves the overload itself) and every
  allocation placed on the input's device, so the file also runs where
  ``torch.jit.load(file, map_location="cuda")`` put it (Triton's libtorch backend loads
  each GPU instance that way).
* ``exported-program``: ``torch.export.export`` of the program with a dynamic batch
  dimension, saved with ``torch.export.save``; device and dtype as recorded.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import fx, nn

from splitpack.core.compile.recording import record

FORMATS = ("torchscript", "exported-program")
MAX_BATCH = 1024  # the largest batch an ExportedProgram accepts (its dynamic dimension needs a bound)


def standalone_program(split: nn.Module, size: tuple[int, int], channels: int = 3,
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> fx.GraphModule:
    """``split``'s program at ``size`` (H, W), holding its constants as plain buffers (no autograd)."""
    program = record(split, torch.zeros((1, channels, *size), dtype=dtype, device=device))
    for name, param in list(program.named_parameters(recurse=False)):
        delattr(program, name)
        program.register_buffer(name, param.detach())  # the same storage, without requires_grad
    return program


def _portable(program: fx.GraphModule) -> fx.GraphModule:
    """A copy TorchScript compiles: overload packets instead of overloads, allocations on the input's device."""
    portable = copy.deepcopy(program)
    graph = portable.graph
    image = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(image):
        device = graph.call_function(getattr, (image, "device"))
    for node in graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": device}
    graph.eliminate_dead_code()
    portable.recompile()
    return portable


def to_torchscript(program: fx.GraphModule) -> torch.jit.ScriptModule:
    return torch.jit.script(_portable(program))


def to_exported_program(program: fx.GraphModule, example: torch.Tensor, max_batch: int = MAX_BATCH):
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return torch.export.export(program, (example,), dynamic_shapes=({0: batch},))


def save(program: fx.GraphModule, fmt: str, path: str | Path, example: torch.Tensor) -> None:
    """Write ``program`` as ``fmt`` (one of :data:`FORMATS`) to ``path``."""
    if fmt == "torchscript":
        torch.jit.save(to_torchscript(program), str(path))
    elif fmt == "exported-program":
        torch.export.save(to_exported_program(program, example), str(path))
    else:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def load(fmt: str, path: str | Path):
    """The artifact as a callable (what a process without splitpack does, see the module docstring)."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()
