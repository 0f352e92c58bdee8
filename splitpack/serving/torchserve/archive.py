"""Package split-pack models as TorchServe .mar archives.

``splitpack archive`` builds ``<out>/<name>.mar`` with the real
``torch-model-archiver``: the weights as a state dict, the handler in
``splitpack/serving/torchserve/handler.py``, a copy of the ``splitpack`` package (so the
archive is self-contained) and a model-config.yaml whose ``handler:`` section
holds the split-pack settings. Changing the merge layer is a YAML edit.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from splitpack.errors import ServerError
from splitpack.publish import staged_path
from splitpack.serving.config import AUTO, ServingConfig, check_deploy, deploy_settings, startup_timeout_s
from splitpack.serving.extras import console_script

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # the splitpack package
HANDLER_FILE = Path(__file__).resolve().parent / "handler.py"
ARCHIVED_HANDLER = "splitpack_handler.py"  # the handler module's name inside a .mar
DEFAULT_MODEL_STORE = Path("model_store")
HANDLER_SECTION = "handler"


class TorchServeError(ServerError):
    """TorchServe could not be started, a model did not load, or archiving failed."""


# -- archive ----------------------------------------------------------------------------


def archive_name(model_name: str) -> str:
    """A model name TorchServe accepts (letters, digits, ``_``, ``-``): ``tv:resnet18`` -> ``tv_resnet18``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", model_name)


def torchserve_keys(deploy: Mapping[str, Any], compile: str = "off") -> dict[str, Any]:
    """Deploy-section values of the schema -> TorchServe's own model-config.yaml keys (see Param.native);
    ``compile``: the model's compile mode, which an ``auto`` start-up timeout follows."""
    keys: dict[str, Any] = {}
    if "replicas" in deploy:
        keys.update(minWorkers=deploy["replicas"], maxWorkers=deploy["replicas"])
    if "batch_size" in deploy:
        keys["batchSize"] = deploy["batch_size"]
    if "max_batch_delay_ms" in deploy:
        keys["maxBatchDelay"] = deploy["max_batch_delay_ms"]
    if "response_timeout_s" in deploy:
        keys["responseTimeout"] = deploy["response_timeout_s"]
    if "startup_timeout_s" in deploy:
        keys["startupTimeout"] = startup_timeout_s(deploy["startup_timeout_s"], compile)
    if deploy.get("instance_kind", "auto") != "auto":
        keys["deviceType"] = deploy["instance_kind"]
    return keys


def model_config_yaml(config: ServingConfig, deploy: Mapping[str, Any], weights_source: str,
                      base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The archive's model-config.yaml: TorchServe's keys (``base``, then ``deploy``) + our ``handler:`` section."""
    top = {k: v for k, v in (base or {}).items() if k != HANDLER_SECTION}
    if "startupTimeout" not in top:  # a base's own value stays, unless deploy sets one
        deploy = {"startup_timeout_s": AUTO, **deploy}
    return {**top, **torchserve_keys(deploy, config.compile),
            HANDLER_SECTION: {**config.to_mapping(), "weights_source": weights_source}}


def read_model_config(model_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ServingConfig:
    """The serving settings of a model-config.yaml's ``handler:`` section, with ``overrides`` applied."""
    section = model_config.get(HANDLER_SECTION) or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{HANDLER_SECTION}: expected a mapping, got {section!r}")
    config, _ = ServingConfig.from_section({**section, **(overrides or {})}, "torchserve")
    return config


def _stage_package(dest: Path) -> None:
    """Copy the splitpack sources (not caches, not sample assets) into ``dest/splitpack``."""
    shutil.copytree(PACKAGE_DIR, dest / "splitpack", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))


def build_archive(config: ServingConfig, deploy: Mapping[str, Any] | None = None, *, pretrained: bool = False,
                  weights: str | Path | None = None, allow_pickle: bool = False, base: Mapping[str, Any] | None = None,
                  name: str | None = None, version: str = "1.0", export_path: str | Path = DEFAULT_MODEL_STORE,
                  force: bool = False, check: bool = True) -> Path:
    """Write ``<export_path>/<name>.mar`` (all or nothing); returns its path. See :func:`write_archive`."""
    name = name or archive_name(config.model_spec().title)
    target = Path(export_path) / f"{name}.mar"
    with staged_path(target, overwrite=force) as tmp:
        write_archive(config, tmp, deploy, pretrained=pretrained, weights=weights, allow_pickle=allow_pickle,
                      base=base, version=version, check=check)
    return target


def write_archive(config: ServingConfig, target: Path, deploy: Mapping[str, Any] | None = None, *,
                  pretrained: bool = False, weights: str | Path | None = None, allow_pickle: bool = False,
                  base: Mapping[str, Any] | None = None, version: str = "1.0", check: bool = True) -> None:
    """Write the archive file ``target`` (its name, less ``.mar``, is the model's name in TorchServe).

    ``deploy``: schema deploy values (replicas, batch_size, ...); missing ones take
    TorchServe's defaults unless ``base`` (a model-config.yaml to start from, the
    operator's way to keep hand-edited TorchServe keys) sets them. With ``check``
    (default) the settings are loaded exactly as the worker will load them and run
    on the bundled sample image first, so a bad merge layer fails here, with the
    list of valid ones, not at serve time. The model file and labels (if any) travel inside the archive,
    next to the splitpack package, at its root (the worker's model_dir).
    """
    archiver = console_script("torch-model-archiver", "torchserve")  # fail before any work when it is missing
    name = Path(target).name.removesuffix(".mar")
    deploy = check_deploy("torchserve", deploy) if base is not None else deploy_settings("torchserve", deploy)
    import torch  # here, not at import: the server commands read archives without it

    from splitpack.serving.package import check_settings, pin_data_config, ship_model_files, source_model

    model, source = source_model(config, pretrained, weights, allow_pickle)
    config = pin_data_config(config, model)
    with tempfile.TemporaryDirectory(prefix="splitpack-archive-") as tmp:
        stage = Path(tmp)
        weights_file = stage / "weights.pt"
        torch.save(model.state_dict(), weights_file)
        del model
        extra = stage / "extra"
        _stage_package(extra)
        config = ship_model_files(config, extra)
        if check:
            check_settings(config, weights_file, base_dir=extra)
        config_file = stage / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(model_config_yaml(config, deploy, source, base), sort_keys=False))
        handler = stage / ARCHIVED_HANDLER
        shutil.copy2(_handler_source(), handler)
        out = stage / "out"
        out.mkdir()
        cmd = [
            archiver, "--model-name", name, "--version", version,
            "--serialized-file", str(weights_file), "--handler", str(handler),
            "--extra-files", str(extra), "--config-file", str(config_file), "--export-path", str(out),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise TorchServeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr or done.stdout}")
        shutil.move(str(out / f"{name}.mar"), target)


def _handler_source() -> Path:
    if not HANDLER_FILE.is_file():
        raise TorchServeError(f"handler not found at {HANDLER_FILE} (a broken splitpack install)")
    return HANDLER_FILE


def read_archive_config(mar: str | Path) -> tuple[str, dict]:
    """(model name, parsed model-config.yaml) of a .mar file."""
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config_name = manifest["model"].get("configFile")
        config = yaml.safe_load(z.read(config_name)) if config_name else {}
    return manifest["model"]["modelName"], config or {}
