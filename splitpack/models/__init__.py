"""Building models: by name (timm names, or ``tv:NAME`` for torchvision) or from the user's own file
and weights (:mod:`splitpack.models.spec`)."""
from __future__ import annotations

from torch import nn

from splitpack.models.spec import (TORCHVISION_PREFIX, ModelError, ModelSpec, build_model, head_classes,  # noqa: F401
                                   model_labels, read_labels)


def create_model(name: str, pretrained: bool = False, weights: str | None = None, **kwargs) -> nn.Module:
    """Build ``name`` in eval mode (``kwargs`` go to timm/torchvision, e.g. ``num_classes=5``).

    ``pretrained=True`` loads real ImageNet weights offline where splitpack ships a
    source for them (see :mod:`splitpack.models.pretrained`); ``weights`` loads a state
    dict or a training checkpoint holding one (``torch.load(..., weights_only=True)``).
    Otherwise the weights are random (memory and exactness do not depend on them).
    """
    num_classes = kwargs.pop("num_classes", None)
    return build_model(ModelSpec(name=name, pretrained=pretrained, weights=weights, model_kwargs=kwargs,
                                 num_classes=num_classes))
