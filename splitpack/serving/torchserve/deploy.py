"""A capacity plan's recommendation as a TorchServe model-config.yaml or archive
(``splitpack capacity --write-torchserve``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from splitpack.serving.deploy import planned_settings


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
