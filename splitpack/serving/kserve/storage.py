"""What ``storageUri`` points to, for KServe's stock runtimes, and the whole ``--write-kserve`` directory.

    DIR/torchserve/inferenceservice.yaml
    DIR/torchserve/storage/config/config.properties
    DIR/torchserve/storage/model-store/<name>.mar     TorchScript program + stock handler + decoder + meta
    DIR/triton/inferenceservice.yaml
    DIR/triton/storage/<name>_libtorch/config.pbtxt   Triton's pytorch_libtorch backend
    DIR/triton/storage/<name>_libtorch/1/model.pt     the same TorchScript program

Both flavours run the recorded split-pack program at the plan's one input size, exported once
(:mod:`splitpack.core.compile.export`): stock images have torch but not splitpack or timm, and a
program of plain aten calls with its weights as constants needs neither.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from splitpack.publish import staged_path
from splitpack.serving.config import ServingConfig
from splitpack.serving.kserve import manifests
from splitpack.serving.kserve.plan import KServePlan
from splitpack.serving.kserve.validate import check_manifest

HANDLER_FILE = Path(__file__).resolve().parent / "stock_handler.py"
DECODE_FILE = Path(__file__).resolve().parents[1] / "decode.py"
ARCHIVED = {"handler": "splitpack_stock_handler.py", "decode": "splitpack_decode.py", "meta": "splitpack_model.json"}
MANIFEST = "inferenceservice.yaml"
STORAGE = "storage"
CROP_MODES = ("center", "squash")  # what the stock handler's transform reproduces
# relative to the unsplit model's output scale: exact mode's promise for fp32 (README)
EXACT_TOLERANCE = 1e-5
STARTUP_SAFETY = 4  # startup timeout / the load + warm-up measured when writing


class ExportedModel:
    """The plan's model, its split-pack program at the plan's size as TorchScript, and what serving needs."""

    def __init__(self, plan: KServePlan, work: Path, config: ServingConfig | None = None, pretrained: bool = False,
                 weights: str | None = None, allow_pickle: bool = False, log: Callable[[str], None] = print):
        """``config``: the model (name or your own model's files, labels) and the serving settings the
        stock handler keeps (topk, decoding limits, data_config); default: the plan's model, defaults."""
        import splitpack
        from splitpack.core.compile import export
        from splitpack.serving.config import weights_data_config
        from splitpack.serving.package import source_model

        self.plan, self.work = plan, work
        self.config = config or ServingConfig.from_mapping({"model_name": plan.model})
        model, self.weights_source = source_model(self.config, pretrained, weights, allow_pickle)
        self.model = model.eval()
        self.data_config = {**weights_data_config(self.model), **(self.config.data_config or {}),
                            "input_size": (3, plan.size, plan.size)}
        if self.data_config.get("crop_mode", "center") not in CROP_MODES:
            raise ValueError(f"crop_mode {self.data_config['crop_mode']!r}: the stock handler reproduces "
                             f"{', '.join(CROP_MODES)}")
        log(f"recording {plan.model} @{plan.size}, plan {plan.plan_text}")
        if plan.merge_layer is None:  # one 1x1 pack up to the first checkpoint: the unsplit model's ops
            split = splitpack.wrap(self.model, splitpack.merge_layers(self.model)[0], grid=(1, 1))
        else:
            split = splitpack.wrap(self.model, plan.merge_layer, plan.grid)
        self.program = export.standalone_program(split, (plan.size, plan.size))
        self.example = torch.randn(2, 3, plan.size, plan.size)
        with torch.inference_mode():
            self.reference = self.model(self.example)
        self.classes = self.reference.shape[-1]
        self.log = log
        self._file: Path | None = None  # exported once, copied for the second flavour
        self.load_s: float | None = None  # loading the exported program + its first (warm-up) call, measured

    def exported(self) -> Path:
        """The TorchScript file, exported (and checked) on first use."""
        if self._file is None:
            self._file = self._export(self.work / "model.pt")
        return self._file

    def write_torchscript(self, path: Path) -> None:
        """The TorchScript file at ``path``: exported once (into the work folder), loaded back and checked
        against the unsplit model (exact mode: the same outputs); copied for every later call."""
        shutil.copy2(self.exported(), path)

    def _export(self, path: Path) -> Path:
        from splitpack.core.compile import export
        from splitpack.errors import ServerError

        self.log(f"exporting TorchScript ({self.plan.model} @{self.plan.size})")
        export.save(self.program, "torchscript", path, self.example)
        start = time.perf_counter()
        with torch.inference_mode():  # what a worker does at start, then its first batch (TorchScript optimizes it)
            out = export.load("torchscript", path)(self.example)
        self.load_s = time.perf_counter() - start
        scale = self.reference.abs().max().item() or 1.0
        error = (out - self.reference).abs().max().item() / scale
        if not error <= EXACT_TOLERANCE:
            raise ServerError(f"the exported program differs from the unsplit model: relative error {error:.1e}")
        return path

    def meta(self) -> dict:
        """splitpack_model.json: what the stock handler needs besides the program."""
        from splitpack.models import model_labels

        cfg, config = self.data_config, self.config
        return {"model": self.plan.model, "plan": self.plan.plan_text, "input_size": self.plan.size,
                "scale_size": math.floor(self.plan.size / (cfg.get("crop_pct") or 0.875)),
                "crop_mode": cfg.get("crop_mode", "center"), "interpolation": cfg.get("interpolation", "bilinear"),
                "mean": list(cfg["mean"]), "std": list(cfg["std"]), "labels": model_labels(self.model, self.classes, config.labels),
                "topk": config.topk, "max_pixels": config.max_pixels, "max_image_bytes": config.max_image_bytes,
                "threads": max(1, self.plan.cpus // self.plan.workers), "weights_source": self.weights_source}


def write_torchserve_storage(exported: ExportedModel, storage: Path, meta: dict) -> Path:
    """``storage/config/config.properties`` and ``storage/model-store/<name>.mar``; returns the .mar."""
    from splitpack.serving.extras import console_script

    archiver = console_script("torch-model-archiver", "torchserve")
    name = manifests.torchserve_model_name(exported.plan)
    (storage / "config").mkdir(parents=True)
    (storage / "config" / "config.properties").write_text(manifests.config_properties(exported.plan))
    store = storage / "model-store"
    store.mkdir()
    with tempfile.TemporaryDirectory(prefix="splitpack-kserve-") as tmp:
        stage = Path(tmp)
        exported.write_torchscript(stage / "model.pt")
        shutil.copy2(HANDLER_FILE, stage / ARCHIVED["handler"])
        shutil.copy2(DECODE_FILE, stage / ARCHIVED["decode"])
        (stage / ARCHIVED["meta"]).write_text(json.dumps(meta, indent=1))
        cmd = [archiver, "--model-name", name, "--version", manifests.TS_VERSION,
               "--serialized-file", str(stage / "model.pt"), "--handler", str(stage / ARCHIVED["handler"]),
               "--extra-files", f"{stage / ARCHIVED['decode']},{stage / ARCHIVED['meta']}",
               "--export-path", str(store)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            from splitpack.serving.torchserve.archive import TorchServeError

            raise TorchServeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr or done.stdout}")
    return store / f"{name}.mar"


def write_triton_storage(exported: ExportedModel, storage: Path, command: str) -> Path:
    """``storage/<name>_libtorch/`` as ``splitpack export --format triton-libtorch`` writes it."""
    from splitpack.serving.triton.libtorch import render_libtorch_config, write_libtorch_model

    plan = exported.plan
    deploy = {"instance_kind": plan.device, "replicas": plan.workers, "batch_size": plan.batch_size,
              "max_batch_delay_ms": plan.max_batch_delay_ms}
    name = manifests.triton_model_name(plan)
    text = render_libtorch_config(name, (3, plan.size, plan.size), exported.classes, torch.float32, deploy,
                                  False, command)
    storage.mkdir(parents=True)
    return write_libtorch_model(storage, name, exported.write_torchscript, text)


def with_measured_startup(plan: KServePlan, load_s: float) -> KServePlan:
    """``plan`` whose startup timeout covers :data:`STARTUP_SAFETY` x the load + warm-up measured here (a pod
    may get slower cores than this machine, and loads under its memory limit): the configured one if longer."""
    return dataclasses.replace(plan, startup_timeout_s=max(plan.startup_timeout_s, math.ceil(STARTUP_SAFETY * load_s)))


def storage_uris(plan: KServePlan, base: str | None) -> dict[str, str]:
    """Where each flavour's storage/ is uploaded: ``BASE/torchserve``, ``BASE/triton``
    (default: a PersistentVolumeClaim named splitpack-models, one folder per service)."""
    base = (base or f"pvc://splitpack-models/{plan.service_name}").rstrip("/")
    return {flavour: f"{base}/{flavour}" for flavour in manifests.FLAVOURS}


def write_kserve(plan: KServePlan, directory: str | Path, **options) -> dict[str, str]:
    """Write both flavours into ``directory`` (all or nothing); returns {flavour: manifest path}.
    ``options``: those of :func:`write_kserve_into`."""
    with staged_path(directory, directory=True) as stage:
        write_kserve_into(plan, stage, **options)
    return {f: str(Path(directory) / f / MANIFEST) for f in manifests.FLAVOURS}


def checked_services(plan: KServePlan, uris: dict[str, str]) -> dict[str, dict]:
    """{flavour: its InferenceService}, each checked against KServe's rules (and the CRD's schema when
    jsonschema is installed)."""
    services = {f: manifests.inference_service(plan, f, uris[f]) for f in manifests.FLAVOURS}
    for service in services.values():
        check_manifest(service, schema=None)
    return services


def write_kserve_into(plan: KServePlan, stage: Path, *, config: ServingConfig | None = None,
                      storage_uri: str | None = None, pretrained: bool = False, weights: str | None = None,
                      allow_pickle: bool = False, command: str = "splitpack",
                      log: Callable[[str], None] | None = None) -> None:
    """Both flavours' manifests and storage, into the existing empty folder ``stage``. Every manifest is
    checked against KServe's rules (and the CRD's schema when jsonschema is installed) before any work,
    and written with the startup timeout the export measured (:func:`with_measured_startup`)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    uris = storage_uris(plan, storage_uri)
    checked_services(plan, uris)
    with tempfile.TemporaryDirectory(prefix="splitpack-kserve-") as work:
        exported = ExportedModel(plan, Path(work), config, pretrained, weights, allow_pickle, log=log)
        exported.exported()
        plan = exported.plan = with_measured_startup(plan, exported.load_s)
        log(f"load + first call of the program: {exported.load_s:.1f} s here -> startup timeout "
            f"{plan.startup_timeout_s} s")
        warning = manifests.timeout_warning(plan)
        if warning:
            log(f"warning: {warning}")
        for flavour, service in checked_services(plan, uris).items():
            (stage / flavour).mkdir()
            (stage / flavour / MANIFEST).write_text(manifests.manifest_yaml(service, command))
        write_triton_storage(exported, stage / "triton" / STORAGE, command)
        write_torchserve_storage(exported, stage / "torchserve" / STORAGE, exported.meta())
