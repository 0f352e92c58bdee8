"""splitpack.serving.predictor without a server: config parsing, decoding, batching, top-k."""
from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import pytest
import torch
from PIL import Image

from splitpack.serving.config import ServingConfig
from splitpack.serving.predictor import SAMPLE_IMAGE, BadRequest, Predictor

MODEL = "tf_efficientnet_lite0"


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int) -> bytes:
    """A small PNG that declares width x height pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(bytes(1000)))


def _predictor(**overrides) -> Predictor:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights on purpose
        return Predictor(ServingConfig(MODEL, **overrides))


@pytest.fixture(scope="module")
def cat_bytes() -> bytes:
    return SAMPLE_IMAGE.read_bytes()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return _predictor()


# -- ServingConfig ------------------------------------------------------------------


def test_from_mapping_reads_strings():
    cfg = ServingConfig.from_mapping(
        {"model": MODEL, "merge-layer": "blocks.2", "grid": "2x3", "mode": "SEED", "topk": "3",
         "native_resolution": "true", "max_side": "512", "max_pixels": "1000000"}
    )
    assert cfg == ServingConfig(MODEL, "blocks.2", (2, 3), "seed", 3, True, 512, 1_000_000)
    assert (cfg.merge_layer, cfg.grid, cfg.topk, cfg.native_resolution) == ("blocks.2", "2x3", 3, True)
    assert ServingConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize("merge_layer", [None, "", "  ", "none", "NONE"])
def test_empty_merge_layer_means_unsplit(merge_layer):
    cfg = ServingConfig.from_mapping({"model_name": MODEL, "merge_layer": merge_layer})
    assert cfg.merge_layer == "none" and cfg.plan is None and not cfg.split


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"merge_layer": "blocks.2"}, "model_name"),
        ({"model_name": ""}, "model_name"),
        ({"model_name": MODEL, "mode": "fast"}, "mode: expected one of exact, seed"),
        ({"model_name": MODEL, "grid": "two"}, "grid"),
        ({"model_name": MODEL, "topk": "0"}, "topk: must be >= 1"),
        ({"model_name": MODEL, "topk": "five"}, "topk: expected an integer"),
        ({"model_name": MODEL, "native_resolution": "maybe"}, "native_resolution"),
        ({"model_name": MODEL, "max_pixels": "-5"}, "max_pixels"),
        ({"model_name": MODEL, "merge_layr": "blocks.2"}, "unknown key.*merge_layr.*known keys"),
    ],
)
def test_from_mapping_errors_are_clear(mapping, message):
    with pytest.raises(ValueError, match=message):
        ServingConfig.from_mapping(mapping)


def test_from_mapping_can_ignore_foreign_keys():
    cfg = ServingConfig.from_mapping({"model_name": MODEL, "EXECUTION_ENV_PATH": "x"}, ignore_unknown=True)
    assert cfg.model_name == MODEL


# -- decode ---------------------------------------------------------------------------


def test_decode_uses_timm_eval_transform(predictor, cat_bytes):
    x = predictor.decode(cat_bytes)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # tf_efficientnet_lite0 normalizes with mean=std=0.5 -> values in [-1, 1]
    assert -1.0 <= float(x.min()) < 0 < float(x.max()) <= 1.0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_decode_converts_any_color_mode(predictor, mode):
    image = Image.new(mode, (40, 30))
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    assert predictor.decode(_encode(image, fmt)).shape == (3, 224, 224)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda cat: b"", "empty request body"),
        (lambda cat: b"this is not an image at all", "not an image"),
        (lambda cat: cat[: len(cat) // 2], "truncated"),
        (lambda cat: _png_bomb(8000, 8000), "too large: 8000x8000 = 64000000 pixels, limit is 50000000"),
        (lambda cat: _png_bomb(12_000, 12_000), "too large: 12000x12000"),  # past PIL's warning limit
        (lambda cat: _png_bomb(100_000, 100_000), "too large: limit is 50000000 pixels"),  # past PIL's hard limit
    ],
    ids=["empty", "garbage", "truncated", "bomb", "bomb-pil-warn", "bomb-pil-error"],
)
def test_decode_rejects_bad_input(predictor, cat_bytes, make, message):
    with pytest.raises(BadRequest, match=message):
        predictor.decode(make(cat_bytes))


def test_pixel_limit_is_per_model(cat_bytes):
    small_limit = _predictor(max_pixels=451 * 300 - 1)
    with pytest.raises(BadRequest, match="limit is 135299 pixels"):
        small_limit.decode(cat_bytes)


def test_native_resolution_keeps_size_up_to_max_side(cat_bytes):
    native = _predictor(native_resolution=True, max_side=256)
    assert native.decode(cat_bytes).shape == (3, 170, 256)  # 451x300 scaled to fit 256
    assert native.decode(_encode(Image.new("RGB", (200, 120)))).shape == (3, 120, 200)
    with pytest.raises(BadRequest, match="too small"):
        native.decode(_encode(Image.new("RGB", (200, 8))))


# -- predict / top_k / serve ------------------------------------------------------------


def test_predict_batches_mixed_sizes_in_order(cat_bytes):
    native = _predictor(native_resolution=True, max_side=128)
    images = [native.decode(cat_bytes), native.decode(_encode(Image.new("RGB", (64, 48), "red"))),
              native.decode(cat_bytes)]
    probs = native.predict(images)
    assert probs.shape == (3, 1000)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    for image, row in zip(images, probs):
        torch.testing.assert_close(native.predict([image])[0], row, atol=1e-5, rtol=0)


def test_top_k_labels_come_from_timm(predictor, cat_bytes):
    from timm.data import ImageNetInfo

    probs = predictor.predict([predictor.decode(cat_bytes)])[0]
    top = predictor.top_k(probs)
    assert [p["index"] for p in top] == probs.topk(5).indices.tolist()
    assert all(p["label"] == ImageNetInfo().index_to_description(p["index"]) for p in top)
    assert [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)
    assert predictor.label(281) == "tabby, tabby cat"


def test_serve_isolates_bad_requests(predictor, cat_bytes):
    """Predictor.serve is what both servers call: one result per request, a bad one fails alone."""
    results = predictor.serve([[cat_bytes], [b"garbage"], cat_bytes, [b""], BadRequest("no image field"),
                               [cat_bytes, b"junk"]])
    assert [type(r).__name__ for r in results] == ["Tensor", "BadRequest", "Tensor", "BadRequest", "BadRequest",
                                                   "BadRequest"]
    assert "not an image" in str(results[1]) and "empty request body" in str(results[3])
    assert str(results[4]) == "no image field"
    assert str(results[5]).startswith("image 1: not an image")  # a request of several images names the bad one
    torch.testing.assert_close(results[0], results[2])
    assert results[0].shape == (1, 1000) and len(predictor.top_k(results[0][0])) == 5


def test_serve_reports_a_server_side_failure_for_that_request_only(cat_bytes):
    """An error that is not the caller's (fault injected: the model fails on 40x40 inputs) is an
    InferenceFailed for that request (HTTP 500 / INTERNAL); the other requests are served."""
    from splitpack.serving.predictor import InferenceFailed

    predictor = _predictor(native_resolution=True, max_side=300)
    healthy = predictor.model

    def fails_on_40x40(x):
        if x.shape[-1] == 40:
            raise RuntimeError("device fell over")
        return healthy(x)

    predictor.model = fails_on_40x40
    small = _encode(Image.new("RGB", (40, 40), "red"), "PNG")
    results = predictor.serve([[cat_bytes], [small], [cat_bytes]])
    assert isinstance(results[1], InferenceFailed) and "RuntimeError: device fell over" in str(results[1])
    torch.testing.assert_close(results[0], results[2])


def test_describe_reports_effective_settings(predictor):
    d = predictor.describe()
    assert d["model_name"] == MODEL and d["split"] is False and d["input_size"] == [3, 224, 224]


# -- split-pack inside the predictor ---------------------------------------------------------

MERGE_LAYER = "blocks.2"  # an exact-mode merge layer of tf_efficientnet_lite0


@pytest.fixture(scope="module")
def split_native() -> Predictor:
    """Exact split-pack 2x3 serving at native resolution (longest side 300)."""
    return _predictor(native_resolution=True, max_side=300, merge_layer=MERGE_LAYER, grid=(2, 3))


def test_exact_split_matches_unsplit(predictor, split_native, cat_bytes):
    assert split_native.describe()["split"] is True
    x = predictor.decode(cat_bytes)  # 224x224, batched twice
    torch.testing.assert_close(split_native.predict([x, x]), predictor.predict([x, x]), atol=1e-5, rtol=0)


def test_exact_split_matches_unsplit_at_native_resolution(predictor, split_native, cat_bytes):
    x = split_native.decode(cat_bytes)
    assert x.shape == (3, 200, 300)
    torch.testing.assert_close(split_native.predict([x]), predictor.predict([x]), atol=1e-5, rtol=0)


def test_seed_mode_serves(predictor, cat_bytes):
    seed = _predictor(merge_layer=MERGE_LAYER, mode="seed")
    x = seed.decode(cat_bytes)
    probs = seed.predict([x])[0]
    assert len(seed.top_k(probs)) == 5 and abs(float(probs.sum()) - 1) < 1e-4
    assert not torch.allclose(probs, predictor.predict([x])[0], atol=1e-7, rtol=0)  # no halo: not exact


def test_unknown_merge_layer_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown merge layer 'blocks\.99'.*valid merge layers.*blocks\.1"):
        _predictor(merge_layer="blocks.99")


def test_pretrained_weights_label_the_cat(cat_bytes):
    """Real weights + the transform they were trained with (kept through data_config)."""
    pretrained = Predictor(ServingConfig(MODEL), weights="pretrained")
    top = pretrained.top_k(pretrained.serve([cat_bytes])[0][0])
    assert top[0]["index"] in range(281, 286), top  # the ImageNet cat classes
    pinned = {k: pretrained.data_config[k] for k in ("mean", "std", "crop_pct", "interpolation")}
    cfg = ServingConfig.from_mapping({"model_name": MODEL, "data_config": json.dumps(pinned)})
    assert cfg.data_config["mean"] == pretrained.data_config["mean"]
    assert ServingConfig.from_mapping(cfg.to_mapping()) == cfg


def test_image_split_pack_cannot_run_is_a_bad_request(split_native, cat_bytes):
    """16x16 merges to 2x2 at blocks.2: too few pixels for a 2x3 grid; the rest are served."""
    tiny = _encode(Image.new("RGB", (16, 16), "blue"), "PNG")
    results = split_native.serve([cat_bytes, tiny, cat_bytes])
    assert isinstance(results[1], BadRequest) and "cannot be served with split-pack 2x3" in str(results[1])
    torch.testing.assert_close(results[0], results[2])


def test_compiled_split_is_recorded_at_load_and_serves_the_same(predictor, cat_bytes):
    """compile: program in the settings: the program for the model's input size is recorded when the model
    loads (batch 1 and 2), reported in describe(), and requests get the interpreter's answers."""
    compiled = _predictor(merge_layer=MERGE_LAYER, grid=(2, 2), compile="program")
    (report,) = compiled.compile_report
    assert report["size"] == [3, 224, 224] and report["mode"] == "program" and set(report["first_call_s"]) == {1, 2}
    assert compiled.describe()["compiled"] == compiled.compile_report and compiled.describe()["compile"] == "program"
    x = predictor.decode(cat_bytes)
    torch.testing.assert_close(compiled.predict([x, x, x]), predictor.predict([x, x, x]), atol=1e-5, rtol=0)
    assert len(compiled.model.compiled.report()) == 1  # batch 3 ran the same program



TINY = "test_efficientnet"  # timm's test model: planning and recording take a second, not a minute


def _tiny_predictor(batch_size: int | None = None, **overrides) -> Predictor:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights on purpose
        return Predictor(ServingConfig(TINY, data_config={"input_size": [3, 64, 64]}, **overrides),
                         batch_size=batch_size)


def test_auto_plan_with_compile_is_recorded_at_load():
    """merge_layer auto + compile: the plan for the model's input size is chosen and its program recorded
    (batch 1 and 2) while the model loads, as for a named merge layer, not on the first request."""
    compiled = _tiny_predictor(merge_layer="auto", compile="program")
    (report,) = compiled.compile_report
    assert report["size"] == [3, 64, 64] and report["mode"] == "program" and set(report["first_call_s"]) == {1, 2}
    (plan,) = compiled.plans()
    assert plan["input_size"] == "3x64x64" and compiled.describe()["compiled"] == compiled.compile_report


@pytest.mark.parametrize("merge_layer, batch_size, buckets", [
    ("blocks.1.0", 16, [1, 2, 4, 8, 16]), ("blocks.1.0", None, [1, 2, 4, 8]),
])
def test_cuda_graph_buckets_follow_the_deployments_batch_size(merge_layer, batch_size, buckets):
    """The servers pass their batch size (batchSize / max_batch_size): every batch they form has a bucket.
    On this CPU the graphs themselves are not captured (CPU inputs run the program); the buckets are set.
    (merge_layer auto passes it on: tests/test_compile.py; both servers: tests/test_auto_serving.py.)"""
    predictor = _tiny_predictor(batch_size, merge_layer=merge_layer, cuda_graphs=True)
    assert predictor.describe()["cuda_graph_buckets"] == buckets


def test_serve_holds_each_image_once_while_the_model_runs(predictor, cat_bytes):
    """A served batch costs what the capacity formula counts: the input batch once, plus the model's own peak.
    Stacking the decoded images into a batch while keeping them would hold each twice (12 MiB more per image
    in flight at 1024 pixels)."""
    from splitpack.measure.meter import peak_meter

    n = 6
    with peak_meter(torch.device("cpu")) as served:
        predictor.serve([cat_bytes] * n)
    batch = torch.stack([predictor.decode(cat_bytes)] * n)
    with torch.inference_mode(), peak_meter(torch.device("cpu")) as model:
        predictor.model(batch)
    image = batch.nbytes // n
    assert served.peak <= model.peak + batch.nbytes + image // 2, (served.peak, model.peak, batch.nbytes, image)
