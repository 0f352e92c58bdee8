"""gRPC client for splitpack models on Triton: send encoded images, read labelled top-k.

Needs only ``tritonclient[grpc]`` and numpy; labels come from the server (``TOP_K``).
Each image is sent as its own request, all at once, so the server's dynamic batcher
can group them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from splitpack.serving.triton.repo import INPUT_IMAGE, OUTPUT_PROBABILITIES, OUTPUT_TOP_K

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MODEL = "tf_efficientnet_lite0"


@dataclass
class Prediction:
    """One image's answer: top-k entries (and probabilities when asked for), or an error."""

    top_k: list[dict] = field(default_factory=list)
    probabilities: np.ndarray | None = None
    error: str | None = None


def image_input(images: list[bytes]):
    """The ``IMAGE`` input for a batch of encoded images (shape ``[n, 1]``, BYTES)."""
    import tritonclient.grpc as grpcclient

    data = np.array([[bytes(b)] for b in images], dtype=np.object_)
    tensor = grpcclient.InferInput(INPUT_IMAGE, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def parse_top_k(row) -> list[dict]:
    """``[b"0.91:281:tabby, tabby cat", ...]`` -> ``[{"probability", "index", "label"}, ...]``."""
    entries = []
    for item in row:
        text = item.decode() if isinstance(item, bytes) else str(item)
        probability, index, label = text.split(":", 2)
        entries.append({"index": int(index), "label": label, "probability": float(probability)})
    return entries


def _outputs(probabilities: bool):
    import tritonclient.grpc as grpcclient

    names = [OUTPUT_TOP_K] + ([OUTPUT_PROBABILITIES] if probabilities else [])
    return [grpcclient.InferRequestedOutput(n) for n in names]


def _predictions(result, probabilities: bool) -> list[Prediction]:
    top = result.as_numpy(OUTPUT_TOP_K)
    probs = result.as_numpy(OUTPUT_PROBABILITIES) if probabilities else None
    return [Prediction(parse_top_k(top[i]), None if probs is None else probs[i]) for i in range(len(top))]


def classify(client, model: str, images: list[bytes], probabilities: bool = False,
             timeout: float | None = None) -> list[Prediction]:
    """One request carrying all ``images`` (it fails as a whole if any image is bad)."""
    result = client.infer(model, [image_input(images)], outputs=_outputs(probabilities), client_timeout=timeout)
    return _predictions(result, probabilities)


def classify_each(client, model: str, images: list[bytes], probabilities: bool = False,
                  timeout: float | None = 120.0) -> list[Prediction]:
    """One request per image, all in flight at once; a bad image only fails its own request."""
    results: list[Prediction | None] = [None] * len(images)
    done = threading.Semaphore(0)

    def callback(index: int):
        def handle(result, error):
            if error is not None:
                results[index] = Prediction(error=error.message() if hasattr(error, "message") else str(error))
            else:
                results[index] = _predictions(result, probabilities)[0]
            done.release()
        return handle

    for i, image in enumerate(images):
        client.async_infer(model, [image_input([image])], callback(i), outputs=_outputs(probabilities),
                           client_timeout=timeout)
    for _ in images:
        if not done.acquire(timeout=(timeout or 600) + 5):
            raise TimeoutError("no answer from the server")
    return results  # type: ignore[return-value]
