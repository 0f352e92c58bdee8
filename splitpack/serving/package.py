"""The steps both generators share (``splitpack archive`` for TorchServe, ``splitpack triton-repo`` for Triton):
take the weights, pin the transform they expect, and check the settings the way the server will load them."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from splitpack.serving.config import ServingConfig, weights_data_config

PRETRAINED = "pretrained"
RANDOM = "random"


def source_model(model_name: str, pretrained: bool = False, weights: str | Path | None = None
                 ) -> tuple[torch.nn.Module, str]:
    """(the model with its weights, where they came from: ``pretrained``, ``file:NAME`` or ``random``)."""
    import splitpack

    if pretrained and weights:
        raise ValueError("give either --pretrained or --weights FILE, not both")
    if pretrained:
        return splitpack.create_model(model_name, pretrained=True), PRETRAINED
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {weights} does not exist")
        return splitpack.create_model(model_name, weights=str(weights)), f"file:{Path(weights).name}"
    warnings.warn(f"{model_name}: neither --pretrained nor --weights given; packaging RANDOM weights", stacklevel=2)
    return splitpack.create_model(model_name), RANDOM


def pin_data_config(config: ServingConfig, model: torch.nn.Module) -> ServingConfig:
    """``config`` with the eval transform the weights expect (unless it names one itself)."""
    if config.data_config is not None:
        return config
    return dataclasses.replace(config, data_config=weights_data_config(model))


def check_settings(config: ServingConfig, weights_file: str | Path | None) -> int:
    """Load ``config`` exactly as a server worker will and classify the bundled sample image, so a bad
    merge layer or weights file fails now, with the valid names, not at serve time; the class count."""
    from splitpack.serving.predictor import SAMPLE_IMAGE, Predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random weights": already said by source_model
        predictor = Predictor(config, weights=str(weights_file) if weights_file else None)
    predictor.predict([predictor.decode(SAMPLE_IMAGE.read_bytes())])
    return predictor.num_classes
