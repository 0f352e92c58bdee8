"""What a graph node is, for messages and shapes: its shape type, the module that ran it, its op's name.
(The rules and the graph both use these; the rules import nothing else of the graph.)"""
from __future__ import annotations

import torch
from torch import fx

Shape = torch.Size | tuple  # a tensor's size, or a tuple of sizes for a tuple-valued node (torch.split)


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module that executed ``node``."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return ""


def describe_op(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))
