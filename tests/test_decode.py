"""splitpack.serving.decode on real files: one test per kind of image a server receives.

Every test writes a real file with PIL (PNG, JPEG, GIF, WebP, TIFF) from a real photo
(splitpack/assets/chelsea.jpg or the ImageNet sample) and checks the decoded pixels
against what the picture looks like, not just the shape.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from splitpack.serving.decode import BACKGROUND, BadRequest, TooLarge, decode_image
from splitpack.serving.predictor import SAMPLE_IMAGE

IMAGENET_SAMPLE = Path("/work/shared/imagenet-sample")
LIMIT = 50_000_000


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    image = decode_image(data, max_pixels=LIMIT)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """Chelsea the cat, 451x300, decoded once by PIL: the reference picture."""
    return Image.open(SAMPLE_IMAGE).convert("RGB")


def test_plain_jpeg_is_unchanged(photo):
    assert np.array_equal(decode(SAMPLE_IMAGE.read_bytes()), np.asarray(photo))


def test_16bit_greyscale_png_is_scaled_not_saturated(photo):
    grey8 = np.asarray(photo.convert("L"))
    grey16 = Image.fromarray(grey8.astype(np.uint16) * 257)  # same picture, full 16-bit range
    data = encode(grey16, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = decode(data)
    # PIL's own convert("RGB") clips every value over 255: the picture turns white.
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (naive == 255).mean() > 0.9
    assert np.array_equal(pixels[..., 0], grey8) and np.array_equal(pixels[..., 1], grey8)
    assert (pixels == 255).mean() < 0.05


def test_16bit_tiff_big_endian_is_scaled():
    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(">u2")
    tiff = Image.frombytes("I;16B", (64, 32), ramp.tobytes())
    pixels = decode(encode(tiff, "TIFF"))
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255
    assert np.abs(pixels[..., 0] - np.rint(ramp / 257)).max() <= 1


def test_palette_png_and_its_transparent_index(photo):
    palette = photo.convert("P", palette=Image.ADAPTIVE, colors=256)
    pixels = decode(encode(palette, "PNG"))
    assert np.array_equal(pixels, np.asarray(palette.convert("RGB")))
    # Index 0 transparent: those pixels show the background, the others their colour.
    index = np.asarray(palette)
    pixels = decode(encode(palette, "PNG", transparency=0))
    assert (pixels[index == 0] == BACKGROUND).all()
    assert np.array_equal(pixels[index != 0], np.asarray(palette.convert("RGB"))[index != 0])


def test_cmyk_jpeg_matches_the_rgb_picture(photo):
    cmyk = photo.convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    error = np.abs(decode(data) - np.asarray(photo).astype(np.int16))
    assert error.mean() < 4  # JPEG compression noise only; an inverted CMYK would be ~120


def test_icc_profile_is_applied(photo):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = decode(encode(photo, "PNG", icc_profile=srgb))
    assert np.abs(pixels - np.asarray(photo)).max() <= 2  # sRGB -> sRGB: the same picture
    broken = decode(encode(photo, "PNG", icc_profile=b"not a profile"))
    assert np.array_equal(broken, np.asarray(photo))  # an unreadable profile is ignored


def test_alpha_is_composited_on_white_not_dropped(photo):
    rgba = photo.convert("RGBA")
    alpha = np.zeros((photo.height, photo.width), np.uint8)
    alpha[:, photo.width // 2:] = 255  # left half transparent, right half opaque
    rgba.putalpha(Image.fromarray(alpha))
    # The transparent half stores black: dropping alpha would show black, not the background.
    stored = np.asarray(rgba).copy()
    stored[:, : photo.width // 2, :3] = 0
    pixels = decode(encode(Image.fromarray(stored, "RGBA"), "PNG"))
    assert (pixels[:, : photo.width // 2] == BACKGROUND).all()
    assert np.array_equal(pixels[:, photo.width // 2:], np.asarray(photo)[:, photo.width // 2:])


def test_half_transparent_greyscale_with_alpha(photo):
    grey = photo.convert("L")
    la = Image.merge("LA", (grey, Image.new("L", grey.size, 128)))
    pixels = decode(encode(la, "PNG"))
    expected = np.rint((np.asarray(grey).astype(np.float64) * 128 + 255 * 127) / 255)
    assert np.abs(pixels[..., 0] - expected).max() <= 1


@pytest.mark.parametrize("orientation, undo", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
                                               (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_is_applied(photo, orientation, undo):
    # A camera stores the sensor's pixels plus a tag saying how to turn them upright.
    stored = photo.transpose(undo)
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = decode(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert pixels.shape == (photo.height, photo.width, 3)
    assert np.abs(pixels - np.asarray(photo)).mean() < 4


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_its_first_frame(fmt):
    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(red, fmt, save_all=True, append_images=[blue], duration=100, loop=0, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    pixels = decode(data)
    assert (np.abs(pixels - (255, 0, 0)) <= 2).all()


def test_one_bit_and_greyscale_images(photo):
    bw = photo.convert("1")
    assert set(np.unique(decode(encode(bw, "PNG")))) <= {0, 255}
    grey = photo.convert("L")
    assert np.array_equal(decode(encode(grey, "PNG"))[..., 2], np.asarray(grey))


def test_real_imagenet_jpegs_decode_like_pil():
    """Ordinary photos (no profile, no orientation tag) come out exactly as PIL decodes them."""
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:20] if IMAGENET_SAMPLE.is_dir() else []
    if not files:
        pytest.skip(f"{IMAGENET_SAMPLE} not on this machine")
    plain = 0
    for path in files:
        image = Image.open(path)
        if image.info.get("icc_profile") or image.getexif().get(0x0112, 1) != 1:
            continue
        plain += 1
        assert np.array_equal(decode(path.read_bytes()), np.asarray(image.convert("RGB"))), path.name
    assert plain >= 10


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", BadRequest, "empty request body"),
        (bytearray(), BadRequest, "empty request body"),  # how TorchServe hands over an empty body
        (b"GIF89a garbage", BadRequest, "not an image|corrupt"),
        ("text", BadRequest, "raw bytes"),
    ],
)
def test_bad_bodies_are_bad_requests(data, error, message):
    with pytest.raises(error, match=message):
        decode_image(data, max_pixels=LIMIT)


def test_byte_limit_is_checked_before_decoding():
    with pytest.raises(TooLarge, match="1001 bytes, limit is 1000 bytes"):
        decode_image(b"x" * 1001, max_pixels=LIMIT, max_bytes=1000)  # not an image: never looked at
    assert TooLarge.status == 413 and BadRequest.status == 400


def test_truncated_photo_is_a_bad_request():
    data = SAMPLE_IMAGE.read_bytes()
    with pytest.raises(BadRequest, match="truncated"):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_sixteen_bit_photo_is_classified_like_the_eight_bit_one(photo):
    """The failure end to end: a 16-bit PNG served a confident wrong class."""
    from splitpack.serving.predictor import Predictor, ServingConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        predictor = Predictor(ServingConfig("tf_efficientnet_lite0"), weights="pretrained")
    grey8 = np.asarray(photo.convert("L"))
    eight = predictor.decode(encode(Image.fromarray(grey8), "PNG"))
    sixteen = predictor.decode(encode(Image.fromarray(grey8.astype(np.uint16) * 257), "PNG"))
    probs = predictor.predict([eight, sixteen])
    assert probs[0].argmax() == probs[1].argmax()
    assert (probs[0] - probs[1]).abs().max() < 1e-4
