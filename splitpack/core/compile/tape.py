"""Recording a run into an fx graph of aten calls, with the batch size left free.

:class:`Tape` is a ``TorchDispatchMode``: while it is active every aten call runs
as usual and is appended to an fx graph, its tensor arguments replaced by the
nodes that made them (tensors made before the recording -- parameters,
buffers, tables built by the rules -- become constants of the graph module; the
parameters themselves, not copies). Tensors are followed by identity through
weak references, so recording keeps nothing alive that the run would free.

A recording holds the sizes of the run it saw. :func:`record_batch_free` records
twice, at batch 1 and batch 2, and keeps the first graph with every integer
argument that doubled rewritten as ``k * x.size(0)``: allocations and reshapes
then follow the input's batch size, everything else is fixed. The two graphs
must be the same op for op (they are: split-pack's schedule never looks at the
batch), else it is an error.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from splitpack.core.execute.executor import is_channels_last
from splitpack.errors import SplitError

# ops whose result is a Python value read off tensor data: a recording would freeze it
DATA_DEPENDENT = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "unique", "_unique2", "masked_select"}


class NotRecordable(SplitError):
    """The run cannot be replayed from a recording (it reads tensor values in Python, or depends on the
    batch size in a way other than proportionally)."""


class Tape(TorchDispatchMode):
    """Records the aten calls of a run into :attr:`graph` (see the module docstring)."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root  # keeps the constants
        self.graph = fx.Graph()
        self.nodes = WeakTensorKeyDictionary()  # tensor -> the node that made it
        self.constants: dict[int, tuple[torch.Tensor, fx.Node]] = {}  # id -> (kept alive here, its get_attr)

    def input(self, name: str, t: torch.Tensor) -> fx.Node:
        node = self.graph.placeholder(name)
        self.nodes[t] = node
        return node

    def output(self, value: Any) -> None:
        self.graph.output(tree_map(self._arg, value))

    def _constant(self, t: torch.Tensor) -> fx.Node:
        if id(t) not in self.constants:
            name = f"_constant{len(self.constants)}"
            if isinstance(t, nn.Parameter):
                self.root.register_parameter(name, t)
            else:
                self.root.register_buffer(name, t, persistent=True)
            self.constants[id(t)] = (t, self.graph.get_attr(name))
        return self.constants[id(t)][1]

    def _arg(self, a: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        node = self.nodes.get(a)
        return node if node is not None else self._constant(a)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in DATA_DEPENDENT:
            raise NotRecordable(f"the run reads tensor values in Python ({func}): a recording would not "
                                f"hold for other inputs; interpret the plan instead (compile=False)")
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if tensors and all(t.device.type == "meta" or isinstance(t, FakeTensor) for t in tensors):
            return out  # stand-ins for size queries, shape propagation: nothing to replay
        node = self.graph.call_function(func, tree_map(self._arg, args), tree_map(self._arg, kwargs))
        if isinstance(out, torch.Tensor):
            self.nodes[out] = node
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self.nodes[t] = self.graph.call_function(operator.getitem, (node, i))
        return out


def record_run(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> fx.GraphModule:
    """``fn(x)`` run once for real, recorded (``x``'s sizes fixed in the graph)."""
    root = nn.Module()
    tape = Tape(root)
    tape.input("image", x)
    with tape:
        out = fn(x)
    tape.output(out)
    gm = fx.GraphModule(root, tape.graph, "SplitPackProgram")
    gm.graph.eliminate_dead_code()  # getitems nobody reads; in-place writes are kept (side effects)
    gm.recompile()
    return gm


# --------------------------------------------------------------------------- batch size

def record_batch_free(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> fx.GraphModule:
    """A recording of ``fn`` at ``x``'s size that runs at any batch size (see the module docstring)."""
    def example(batch):
        return torch.zeros((batch, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(
            memory_format=memory_format(x))

    one, two = record_run(fn, example(1)), record_run(fn, example(2))
    return free_batch(one, two)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-d tensor, else contiguous."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def free_batch(one: fx.GraphModule, two: fx.GraphModule) -> fx.GraphModule:
    """``one`` (recorded at batch 1) with each integer that is doubled in ``two`` (batch 2) made
    proportional to the input's batch size."""
    nodes_one, nodes_two = list(one.graph.nodes), list(two.graph.nodes)
    if len(nodes_one) != len(nodes_two):
        raise NotRecordable(f"the run at batch 2 executes {len(nodes_two)} ops, at batch 1 {len(nodes_one)}")
    position = {n: i for i, n in enumerate(nodes_two)}
    position.update({n: i for i, n in enumerate(nodes_one)})
    image = nodes_one[0]
    batch: list[fx.Node] = []  # x.size(0), made once before its first use
    scaled: dict[int, fx.Node] = {}

    def times_batch(k: int, before: fx.Node) -> fx.Node:
        if not batch:
            with one.graph.inserting_after(image):
                batch.append(one.graph.call_method("size", (image, 0)))
        if k == 1:
            return batch[0]
        if k not in scaled:
            with one.graph.inserting_before(before):
                scaled[k] = one.graph.call_function(operator.mul, (batch[0], k))
        return scaled[k]

    for a, b in zip(nodes_one, nodes_two):
        if a.op != b.op or a.target != b.target and a.op != "get_attr":
            raise NotRecordable(f"the run differs between batch sizes at {a.format_node()} / {b.format_node()}")
        where = a
        a.args = _merge(a.args, b.args, position, lambda k: times_batch(k, where), a)
        a.kwargs = _merge(a.kwargs, b.kwargs, position, lambda k: times_batch(k, where), a)
    _check_constants(one, two, nodes_one, nodes_two)
    one.recompile()
    return one


def _merge(x1, x2, position, times_batch, where):
    """Arguments of batch 1 with batch-proportional integers replaced (``position``: node -> its index
    in its own graph)."""
    if isinstance(x1, fx.Node):
        if not isinstance(x2, fx.Node) or position[x1] != position[x2]:
            raise NotRecordable(f"the run reads different values at batch 1 and 2 in {where.format_node()}")
        return x1
    if isinstance(x1, (tuple, list)):
        if not isinstance(x2, (tuple, list)) or len(x1) != len(x2):
            raise NotRecordable(f"arguments differ between batch sizes in {where.format_node()}")
        return type(x1)(_merge(a, b, position, times_batch, where) for a, b in zip(x1, x2))
    if isinstance(x1, dict):
        return {k: _merge(v, x2[k], position, times_batch, where) for k, v in x1.items()}
    if isinstance(x1, int) and not isinstance(x1, bool) and x1 != x2:
        if x2 != 2 * x1:
            raise NotRecordable(f"an argument of {where.format_node()} is {x1} at batch 1 and {x2} at batch 2 "
                                f"(not proportional to the batch size)")
        return times_batch(x1)
    if x1 != x2 and not (x1 != x1 and x2 != x2):  # NaN == NaN here
        raise NotRecordable(f"arguments differ between batch sizes in {where.format_node()}: {x1!r} / {x2!r}")
    return x1


def _check_constants(one: fx.GraphModule, two: fx.GraphModule, nodes_one, nodes_two) -> None:
    for a, b in zip(nodes_one, nodes_two):
        if a.op != "get_attr":
            continue
        t1, t2 = getattr(one, a.target), getattr(two, b.target)
        if t1 is t2:
            continue
        if t1.shape != t2.shape or t1.dtype != t2.dtype or not torch.equal(t1, t2):
            raise NotRecordable(f"a constant made during the run differs between batch sizes ({a.target})")
