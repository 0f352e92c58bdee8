"""A capacity plan's recommendation as a Triton model directory (``splitpack capacity --write-triton``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from splitpack.serving.deploy import planned_settings


def triton_model_name(plan: dict, name: str | None = None) -> str:
    from splitpack.serving.triton.repo import default_model_name

    return name or default_model_name(plan["model"])


def write_triton(plan: dict, repo: str | Path, settings: Mapping[str, Any] | None = None, name: str | None = None,
                 pretrained: bool = False, weights: str | None = None, allow_pickle: bool = False) -> Path:
    """A Triton model directory ``repo/<name>`` for the recommendation (instance_group count = replicas),
    all or nothing."""
    from splitpack.publish import staged_path

    model_dir = Path(repo) / triton_model_name(plan, name)
    with staged_path(model_dir, directory=True) as stage:
        write_triton_into(plan, stage, model_dir.name, settings, pretrained=pretrained, weights=weights,
                          allow_pickle=allow_pickle)
    return model_dir


def write_triton_into(plan: dict, directory: Path, name: str, settings: Mapping[str, Any] | None = None,
                      pretrained: bool = False, weights: str | None = None, allow_pickle: bool = False) -> None:
    """The model directory's content, into ``directory`` (existing, empty): for callers that publish it."""
    from splitpack.serving.triton.repo import TritonModelSpec, write_model_dir

    config, deploy = planned_settings(plan, settings, "triton")
    write_model_dir(TritonModelSpec(config, deploy, name=name, pretrained=pretrained, weights=weights,
                                    allow_pickle=allow_pickle), directory)
