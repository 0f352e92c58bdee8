"""One way to build a model by name: timm names, or ``tv:NAME`` for torchvision."""
from __future__ import annotations

import torch
from torch import nn

TORCHVISION_PREFIX = "tv:"


def create_model(name: str, pretrained: bool = False, weights: str | None = None, **kwargs) -> nn.Module:
    """Build ``name`` in eval mode.

    ``pretrained=True`` loads real ImageNet weights offline where splitpack ships a
    source for them (see :mod:`splitpack.models.pretrained`); ``weights`` loads a state
    dict file with ``torch.load(..., weights_only=True)``. Otherwise the weights are
    random (memory and exactness do not depend on them).
    """
    if pretrained and weights:
        raise ValueError("give either pretrained=True or weights=FILE, not both")
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        model = torchvision.models.get_model(name[len(TORCHVISION_PREFIX):], weights=None, **kwargs)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained:
        from splitpack.models.pretrained import load_pretrained

        load_pretrained(model, name)
    elif weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()
