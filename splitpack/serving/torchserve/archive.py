"""Package split-pack models as TorchServe .mar archives.

``splitpack archive`` builds ``<export-path>/<name>.mar`` with the real
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
import warnings
import zipfile
from pathlib import Path

import yaml

from splitpack.errors import ServerError
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


def model_config_yaml(
    serving: dict,
    *,
    batch_size: int = 1,
    max_batch_delay_ms: int = 50,
    workers: int = 1,
    response_timeout_s: int = 120,
    weights_source: str = "file",
) -> dict:
    """The archive's model-config.yaml: TorchServe worker/batch settings + our ``handler:`` section."""
    return {
        "minWorkers": workers,
        "maxWorkers": workers,
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": response_timeout_s,
        HANDLER_SECTION: {**serving, "weights_source": weights_source},
    }


def _stage_package(dest: Path) -> None:
    """Copy the splitpack sources (not caches, not sample assets) into ``dest/splitpack``."""
    shutil.copytree(PACKAGE_DIR, dest / "splitpack", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))


def build_archive(
    model_name: str | None = None,
    *,
    model_config: dict | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    merge_layer: str | None = None,
    grid: str | tuple[int, int] = (2, 2),
    mode: str = "exact",
    topk: int = 5,
    native_resolution: bool = False,
    max_side: int = 1024,
    max_pixels: int = 50_000_000,
    batch_size: int = 1,
    max_batch_delay_ms: int = 50,
    workers: int = 1,
    response_timeout_s: int = 120,
    name: str | None = None,
    version: str = "1.0",
    export_path: str | Path = DEFAULT_MODEL_STORE,
    force: bool = False,
    validate: bool = True,
) -> Path:
    """Write ``<export_path>/<name>.mar``; returns its path.

    ``model_config``: a whole model-config.yaml (TorchServe keys + ``handler:``
    section) to archive instead of the split/batch keyword arguments; the
    operator's way to change settings by editing YAML. With ``validate`` (default) the archive's settings are loaded exactly as the
    worker will load them and run on the bundled sample image first, so a bad
    merge layer fails here, with the list of valid ones, not at serve time.
    """
    import torch
    import splitpack
    from splitpack.serving.config import ServingConfig, weights_data_config
    from splitpack.serving.predictor import SAMPLE_IMAGE, Predictor

    if model_config is not None:
        section = {k: v for k, v in (model_config.get(HANDLER_SECTION) or {}).items() if k != "weights_source"}
        if model_name and section.get("model_name", model_name) != model_name:
            raise ValueError(f"--model {model_name} differs from model_name {section['model_name']} in the config")
        config = ServingConfig.from_mapping({"model_name": model_name, **section} if model_name else section)
        server_settings = {k: v for k, v in model_config.items() if k != HANDLER_SECTION}
    else:
        if not model_name:
            raise ValueError("a model name is required (--model NAME, or model_name in the config's handler section)")
        config = ServingConfig(
            model_name, merge_layer=merge_layer, grid=grid, mode=mode, topk=topk,
            native_resolution=native_resolution, max_side=max_side, max_pixels=max_pixels,
        )
        server_settings = model_config_yaml({}, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms,
                                            workers=workers, response_timeout_s=response_timeout_s)
        server_settings.pop(HANDLER_SECTION)
    model_name = config.model_name
    name = name or archive_name(model_name)
    export_path = Path(export_path)
    target = export_path / f"{name}.mar"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    if pretrained:
        model, source = splitpack.create_model(model_name, pretrained=True), "pretrained"
    elif weights:
        model, source = splitpack.create_model(model_name, weights=weights), f"file:{Path(weights).name}"
    else:
        warnings.warn(f"{model_name}: neither --pretrained nor --weights given; archiving RANDOM weights",
                      stacklevel=2)
        model, source = splitpack.create_model(model_name), "random"
    # Pin the transform the weights expect (e.g. TF-Lite mean/std for the pretrained lite models).
    if config.data_config is None:
        config.data_config = weights_data_config(model)

    with tempfile.TemporaryDirectory(prefix="splitpack-archive-") as tmp:
        stage = Path(tmp)
        weights_file = stage / "weights.pt"
        torch.save(model.state_dict(), weights_file)
        del model
        if validate:
            predictor = Predictor(config, weights=str(weights_file))
            predictor.predict([predictor.decode(SAMPLE_IMAGE.read_bytes())])
        config_file = stage / "model-config.yaml"
        handler_section = {**config.to_mapping(), "weights_source": source}
        config_file.write_text(yaml.safe_dump({**server_settings, HANDLER_SECTION: handler_section},
                                              sort_keys=False))
        extra = stage / "extra"
        _stage_package(extra)
        handler = stage / ARCHIVED_HANDLER
        shutil.copy2(_handler_source(), handler)
        export_path.mkdir(parents=True, exist_ok=True)
        cmd = [
            console_script("torch-model-archiver", "torchserve"), "--model-name", name, "--version", version,
            "--serialized-file", str(weights_file), "--handler", str(handler),
            "--extra-files", str(extra), "--config-file", str(config_file),
            "--export-path", str(export_path),
        ] + (["--force"] if force else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise TorchServeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr or done.stdout}")
    return target


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
