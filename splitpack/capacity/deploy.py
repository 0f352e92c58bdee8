"""Deploy a capacity plan: the Triton model directory or TorchServe config that runs its recommendation."""
from __future__ import annotations

from pathlib import Path


def _serving_mapping(plan: dict) -> dict:
    from splitpack.serving.predictor import ServingConfig

    rec = plan["recommended"]
    return ServingConfig(plan["model"], merge_layer=rec["merge_layer"], grid=rec["grid"] or "2x2",
                         mode=rec["mode"] or "exact").to_mapping()


def write_triton(plan: dict, repo: str | Path, kind: str = "gpu", name: str | None = None,
                 pretrained: bool = False, weights: str | None = None) -> Path:
    """A Triton model directory for the recommendation: instance_group count = replicas."""
    from splitpack.serving.triton.repo import TritonModelSpec, generate_model_dir

    rec = plan["recommended"]
    spec = TritonModelSpec(model=plan["model"], merge_layer=rec["merge_layer"], grid=rec["grid"] or "2x2",
                           mode=rec["mode"] or "exact", name=name, pretrained=pretrained,
                           weights=Path(weights) if weights else None, instances=max(1, rec["replicas"]),
                           kind=kind, max_batch_size=plan["batch_size"])
    return generate_model_dir(spec, Path(repo))


def torchserve_model_config(plan: dict, kind: str = "gpu") -> dict:
    """model-config.yaml content: min/maxWorkers = replicas, batchSize = the planned batch."""
    from splitpack.serving.torchserve.archive import model_config_yaml

    config = model_config_yaml(_serving_mapping(plan), batch_size=plan["batch_size"],
                               workers=max(1, plan["recommended"]["replicas"]))
    if kind == "gpu":
        config["deviceType"] = "gpu"
    return config


def write_torchserve(plan: dict, path: str | Path, kind: str = "gpu", pretrained: bool = False,
                     weights: str | None = None) -> Path:
    """``*.mar``: a full archive via ``splitpack archive``; anything else: the model-config.yaml
    to give torch-model-archiver ``--config-file``."""
    import yaml

    path = Path(path)
    rec = plan["recommended"]
    if path.suffix == ".mar":
        from splitpack.serving.torchserve.archive import build_archive

        return build_archive(plan["model"], pretrained=pretrained, weights=weights, merge_layer=rec["merge_layer"],
                             grid=rec["grid"] or "2x2", mode=rec["mode"] or "exact", batch_size=plan["batch_size"],
                             workers=max(1, rec["replicas"]), name=path.stem, export_path=path.parent or ".",
                             force=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(torchserve_model_config(plan, kind), sort_keys=False))
    return path
