"""Deploy a capacity plan: the Triton model directory or TorchServe config that runs its recommendation.

The plan decides the merge layer, grid, mode, replicas and batch size; every other
serving parameter (schema: :mod:`splitpack.serving.config`) comes from ``settings``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from splitpack.serving.config import DEPLOY, MODEL, BY_NAME, ServingConfig

# what a plan decides; the CLI offers the schema's other flags for the written configs
PLANNED = ("model_name", "merge_layer", "grid", "mode", "replicas", "batch_size")


def planned_settings(plan: dict, settings: Mapping[str, Any] | None, server: str) -> tuple[ServingConfig, dict[str, Any]]:
    """(serving config, ``server``'s deploy values) of the plan's recommendation; ``settings`` fill the
    schema's other parameters (those of another server are left out)."""
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    decided = sorted(set(settings) & set(PLANNED))
    if decided:
        raise ValueError(f"{', '.join(decided)}: set by the plan, not by the written config")
    rec = plan["recommended"]
    own_class = settings.get("model_class") is not None  # else the plan's model is a timm/torchvision name
    config = ServingConfig.from_mapping({k: v for k, v in settings.items() if BY_NAME[k].section == MODEL} | {
        "model_name": None if own_class else plan["model"], "merge_layer": rec["merge_layer"],
        "grid": rec["grid"] or "2x2", "mode": rec["mode"] or "exact"})
    deploy = {k: v for k, v in settings.items() if BY_NAME[k].section == DEPLOY and server in BY_NAME[k].servers}
    deploy |= {"replicas": max(1, rec["replicas"]), "batch_size": plan["batch_size"]}
    return config, deploy


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


def torchserve_model_config(plan: dict, settings: Mapping[str, Any] | None = None) -> dict:
    """model-config.yaml content: min/maxWorkers = replicas, batchSize = the planned batch."""
    from splitpack.serving.config import deploy_settings
    from splitpack.serving.torchserve.archive import model_config_yaml

    config, deploy = planned_settings(plan, settings, "torchserve")
    return model_config_yaml(config, deploy_settings("torchserve", deploy), weights_source="file")


def write_torchserve(plan: dict, path: str | Path, settings: Mapping[str, Any] | None = None,
                     pretrained: bool = False, weights: str | None = None, allow_pickle: bool = False) -> Path:
    """``*.mar``: a full archive (as ``splitpack archive`` builds it); anything else: the model-config.yaml
    to give torch-model-archiver ``--config-file``. All or nothing."""
    from splitpack.publish import staged_path

    with staged_path(path) as tmp:
        write_torchserve_into(plan, tmp, settings, pretrained=pretrained, weights=weights, allow_pickle=allow_pickle)
    return Path(path)


def write_torchserve_into(plan: dict, path: Path, settings: Mapping[str, Any] | None = None,
                          pretrained: bool = False, weights: str | None = None, allow_pickle: bool = False) -> None:
    """:func:`write_torchserve` to exactly ``path`` (its name decides the model's), for callers that publish it."""
    import yaml

    if Path(path).suffix == ".mar":
        from splitpack.serving.torchserve.archive import write_archive

        config, deploy = planned_settings(plan, settings, "torchserve")
        write_archive(config, Path(path), deploy, pretrained=pretrained, weights=weights, allow_pickle=allow_pickle)
    else:
        Path(path).write_text(yaml.safe_dump(torchserve_model_config(plan, settings), sort_keys=False))
