"""The Triton python-backend model behind every generated ``1/model.py``.

Runs inside Triton's python-backend stub (``triton_python_backend_utils`` is only
importable there, so it is imported lazily or passed in). Settings come from the
``parameters`` of config.pbtxt; loading, serving, gauges and error mapping come from
:class:`splitpack.serving.replica.Replica`, shared with the TorchServe handler. What is Triton's
here: input tensors in, output tensors and ``TritonError`` codes out.

Each request carries a batch of encoded images (``IMAGE``, shape ``[n, 1]``). Requests
are isolated by the replica, the policy the TorchServe handler runs too: a
request whose image is bad (or too small for the grid) gets its own INVALID_ARGUMENT
``TritonError``, a server-side failure INTERNAL; the other requests of the same dynamic
batch are served.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from splitpack.serving.predictor import BadRequest, Predictor
from splitpack.serving.replica import Replica, answer
from splitpack.serving.triton.repo import INPUT_IMAGE, OUTPUT_PROBABILITIES, OUTPUT_TOP_K, config_parameters


def resolve_weights(value: str, version_dir: Path) -> str | None:
    """The ``weights`` parameter -> a file path (relative to the version dir), or None (random)."""
    if not value:
        return None
    path = Path(value) if Path(value).is_absolute() else Path(version_dir) / value
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} (parameter weights={value!r}) does not exist; "
            "regenerate the model with `splitpack triton-repo` (see the command at the top of config.pbtxt)")
    return str(path)


def instance_device(args: dict) -> str:
    """The torch device of this model instance (instance_group kind)."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"


def format_top_k(entries: list[dict]) -> list[bytes]:
    """Triton's classification format ``probability:index:label``."""
    return [f"{e['probability']:.6f}:{e['index']}:{e['label']}".encode() for e in entries]


def _instances(model_config: dict) -> int:
    """Instances of this model (each its own stub process), from config.pbtxt's instance_group."""
    return sum(int(g.get("count", 1)) for g in model_config.get("instance_group", [])) or 1


def _output_dims(model_config: dict, name: str) -> list[int]:
    for output in model_config.get("output", []):
        if output["name"] == name:
            return [int(d) for d in output["dims"]]
    raise ValueError(f"config.pbtxt declares no output {name!r}")


class SplitPackTritonModel:
    """initialize/execute/finalize of a TritonPythonModel, for one model instance."""

    def __init__(self, args: dict, pb_utils: Any = None):
        if pb_utils is None:
            import triton_python_backend_utils as pb_utils
        self.pb = pb_utils
        self.model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.instance = args.get("model_instance_name", self.name)
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        # An unknown merge layer raises ValueError naming the valid layers: Triton logs it and marks the
        # model as failed to load.
        self.replica = Replica(config_parameters(self.model_config), "triton", replicas=_instances(self.model_config),
                               weights=lambda artifacts: resolve_weights(artifacts.get("weights", ""), version_dir),
                               device=instance_device(args), base_dir=version_dir, warn=self.log_warn,
                               check=self._check_outputs,
                               batch_size=max(1, int(self.model_config.get("max_batch_size", 0))))
        self.predictor = self.replica.predictor
        self.replica.gauges = self._gauges()
        self.log_info(f"{self.instance} ready: {json.dumps(self.replica.describe())}")

    def _check_outputs(self, predictor: Predictor) -> None:
        """config.pbtxt dims must match the model; a mismatch is a generation mistake."""
        num_classes, topk = predictor.num_classes, predictor.config.topk
        if _output_dims(self.model_config, OUTPUT_PROBABILITIES) != [num_classes]:
            raise ValueError(f"{OUTPUT_PROBABILITIES} dims must be [{num_classes}] for "
                             f"{predictor.config.model_spec().title}")
        if _output_dims(self.model_config, OUTPUT_TOP_K) != [min(topk, num_classes)]:
            raise ValueError(f"{OUTPUT_TOP_K} dims must be [{min(topk, num_classes)}] (parameter topk={topk})")

    def _gauges(self):
        """Device-memory and plan gauges for capacity planning; None if metrics are off."""
        try:
            from splitpack.serving.triton.metrics import TritonGauges

            return TritonGauges(self.pb, {"model": self.name, "instance": self.instance})
        except Exception as err:  # metrics disabled on the server, or an older backend
            self.log_info(f"memory metrics not reported: {err}")
            return None

    # -- requests -------------------------------------------------------------------

    def execute(self, requests: list) -> list:
        """One response per request, each isolated by the replica (the TorchServe handler's policy)."""
        outcomes = self.replica.serve([self._payload(request) for request in requests])
        return [answer(outcome, self._response, self._refuse) for outcome in outcomes]

    def _payload(self, request) -> list | BadRequest:
        """The request's encoded images (``IMAGE``, shape ``[n, 1]``)."""
        tensor = self.pb.get_input_tensor_by_name(request, INPUT_IMAGE)
        if tensor is None:
            return BadRequest(f"missing input {INPUT_IMAGE}")
        return list(tensor.as_numpy().reshape(-1))

    def _response(self, outcome):
        pb = self.pb
        top = np.array([format_top_k(self.predictor.top_k(row)) for row in outcome], dtype=object)
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor(OUTPUT_PROBABILITIES, outcome.numpy().astype(np.float32)),
            pb.Tensor(OUTPUT_TOP_K, top),
        ])

    def _refuse(self, outcome):
        """INVALID_ARGUMENT for the caller's fault (a bad image), INTERNAL for the server's."""
        error_type = self.pb.TritonError
        code_value = getattr(error_type, "INVALID_ARG" if outcome.status < 500 else "INTERNAL", None)
        error = error_type(str(outcome), code_value) if code_value is not None else error_type(str(outcome))
        return self.pb.InferenceResponse(output_tensors=[], error=error)

    def finalize(self) -> None:
        self.log_info(f"{self.instance} unloading")
        self.predictor = self.replica = None

    # -- logging into the server log --------------------------------------------------

    def log_info(self, message: str) -> None:
        self.pb.Logger.log_info(f"[splitpack] {message}")

    def log_warn(self, message: str) -> None:
        self.pb.Logger.log_warn(f"[splitpack] {message}")

    def log_error(self, message: str) -> None:
        self.pb.Logger.log_error(f"[splitpack] {message}")


class TritonPythonModel:
    """The class Triton's python backend instantiates (every generated ``1/model.py`` imports it)."""

    def initialize(self, args):
        self.model = SplitPackTritonModel(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
