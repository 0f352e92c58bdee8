"""The steps both generators share (``splitpack archive`` for TorchServe, ``splitpack triton-repo`` for Triton):
take the model and its weights, ship the user's model and labels files, pin the transform the weights expect,
and check the settings the way the server will load them."""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import torch

from splitpack.models import build_model, head_classes, model_labels, read_labels
from splitpack.serving.config import PRETRAINED, ServingConfig, weights_data_config

RANDOM = "random"
# the names of the user's files inside a .mar (its root) and a Triton model version directory
MODEL_FILE = "user_model.py"
LABELS_FILE = "labels.txt"


def source_model(config: ServingConfig, pretrained: bool = False, weights: str | Path | None = None,
                 allow_pickle: bool = False) -> tuple[torch.nn.Module, str]:
    """(the model with its weights, where they came from: ``pretrained``, ``file:NAME`` or ``random``).
    Its labels file, if any, is checked against its head here, so nothing is written for a wrong one."""
    if pretrained and weights:
        raise ValueError("give either --pretrained or --weights FILE, not both")
    spec = config.model_spec(PRETRAINED if pretrained else weights, allow_pickle=allow_pickle)
    if not pretrained and not weights:
        warnings.warn(f"{spec.title}: neither --pretrained nor --weights given; packaging RANDOM weights",
                      stacklevel=2)
    model = build_model(spec)
    model_labels(model, head_classes(model), spec.labels)
    return model, PRETRAINED if pretrained else f"file:{Path(weights).name}" if weights else RANDOM


def ship_model_files(config: ServingConfig, directory: Path) -> ServingConfig:
    """Copy ``config``'s model file and labels (rewritten one label per line) into ``directory``, so the
    deployment does not need the user's source tree; returns the config naming the copies."""
    spec = config.model_spec()
    copies = {}
    if spec.model_file is not None:
        shutil.copyfile(spec.model_file, Path(directory) / MODEL_FILE)
        copies["model_file"] = MODEL_FILE
    if spec.labels is not None:
        (Path(directory) / LABELS_FILE).write_text("\n".join(read_labels(spec.labels)) + "\n", encoding="utf-8")
        copies["labels"] = LABELS_FILE
    return dataclasses.replace(config, **copies)


def pin_data_config(config: ServingConfig, model: torch.nn.Module) -> ServingConfig:
    """``config`` with the eval transform the weights expect; the keys ``config`` names itself win
    (a capacity plan pins only the input size it planned for)."""
    return dataclasses.replace(config, data_config=weights_data_config(model) | (config.data_config or {}))


def check_settings(config: ServingConfig, weights_file: str | Path | None, base_dir: str | Path | None = None) -> int:
    """Load ``config`` exactly as a server worker will (its files in ``base_dir``) and classify the bundled
    sample image, so a bad merge layer or weights file fails now, with the valid names, not at serve time;
    the class count."""
    from splitpack.serving.predictor import SAMPLE_IMAGE
    from splitpack.serving.replica import build_predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random weights": already said by source_model
        predictor = build_predictor(config, str(weights_file) if weights_file else None, base_dir=base_dir)
    predictor.predict([predictor.decode(SAMPLE_IMAGE.read_bytes())])
    return predictor.num_classes
