"""Encoded image bytes -> an 8-bit RGB PIL image, the same way for every server.

What a photo-classification model expects is "the picture a person would see", so
the decoder resolves everything an image file can say about how to show it:

- **size limits first**: the body's byte size, then the pixel count the header
  declares (a decompression bomb is refused before any pixel is decoded);
- **bit depth**: 16-bit greyscale (PNG/TIFF ``I;16``) and 32-bit integer images are
  scaled to 8 bits (``x / 257``), not clipped (PIL's ``convert("RGB")`` saturates
  every value above 255, i.e. almost the whole image);
- **palette** images, with or without a transparent index;
- **CMYK** (and any image carrying an ICC profile) through the embedded profile to
  sRGB when PIL's colour engine can read it, PIL's conversion otherwise;
- **alpha** (RGBA, LA, PA, palette transparency) composited over :data:`BACKGROUND`
  (white, as a browser shows it), never dropped (a dropped alpha reveals whatever
  colour the transparent pixels happen to store);
- **EXIF orientation** applied, so a phone photo is classified upright;
- **animated** GIF/APNG/WebP: the first frame.

Anything else PIL cannot turn into RGB is a :class:`BadRequest` with a message meant
for the caller; servers answer it with a 4xx for that request only.
"""
from __future__ import annotations

import functools
import io
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Transparent pixels are shown on white (what a browser or an image viewer does).
BACKGROUND = (255, 255, 255)
# Modes holding integers wider than 8 bits; scaled from the 16-bit range to 8 bits.
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadRequest(ValueError):
    """The request itself is wrong (not an image, truncated, too large...).

    Its message is safe and meant to be shown to the caller; servers map it to a 4xx
    response (``status``) for that request only.
    """

    status = 400


class TooLarge(BadRequest):
    """The request is over a size limit (bytes or pixels): HTTP 413 on TorchServe."""

    status = 413


def check_size(data: bytes, max_bytes: int | None) -> None:
    """Refuse a body over ``max_bytes`` before anything looks at its content."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"image too large: {len(data)} bytes, limit is {max_bytes} bytes")


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None,
                 background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """``data`` (JPEG, PNG, GIF, WebP, TIFF, BMP, ...) -> an upright 8-bit RGB image.

    Raises :class:`BadRequest` (:class:`TooLarge` for the size limits) with a message
    for the caller.
    """
    data = _as_bytes(data)
    check_size(data, max_bytes)
    try:
        with warnings.catch_warnings():
            # PIL warns (and later raises) on its own global pixel limit; ours is per model.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image, max_pixels)
            image.seek(0)  # animated: the first frame
            image.load()  # decode now, so truncated data fails here, per request
            image = ImageOps.exif_transpose(image)
            return to_rgb(image, background)
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest("not an image: the body could not be identified as an image format PIL reads") from None
    except Image.DecompressionBombError as e:  # PIL's own hard limit, hit inside Image.open
        raise TooLarge(f"image too large: limit is {max_pixels} pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated ...").
        raise BadRequest(f"corrupt or truncated image: {e}") from None


def _as_bytes(data) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise BadRequest(f"expected the encoded image as raw bytes, got {type(data).__name__} "
                         "(send it with Content-Type: application/octet-stream or image/*)")
    if not data:
        raise BadRequest("empty request body: send the encoded image (JPEG, PNG, ...) as the body")
    return data


def _check_pixels(image: Image.Image, limit: int) -> None:
    width, height = image.size
    if width * height > limit:
        raise TooLarge(f"image too large: {width}x{height} = {width * height} pixels, limit is {limit} pixels")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB as it would be displayed (see the module docstring)."""
    if image.mode in WIDE_INTEGER_MODES:
        image = _wide_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "L" and "transparency" in image.info:
        image = image.convert("LA")
    elif image.mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        return _composite(image, background)
    if image.info.get("icc_profile") and image.mode in ("RGB", "CMYK"):
        converted = _through_icc(image)
        if converted is not None:
            return converted
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:  # e.g. LAB/HSV/F without a defined conversion
        raise BadRequest(f"unsupported image mode {image.mode!r}: {e}") from None


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer, read as 16-bit range) greyscale -> 8-bit ``L``, scaled not clipped."""
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _through_icc(image: Image.Image) -> Image.Image | None:
    """Convert with the embedded ICC profile to sRGB; None if the profile cannot be used."""
    try:
        transform = _icc_transform(image.info["icc_profile"], image.mode)
        return ImageCms.applyTransform(image, transform)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


@functools.lru_cache(maxsize=16)
def _icc_transform(profile: bytes, mode: str):
    """One transform per (profile, mode): building it costs far more than applying it."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return ImageCms.buildTransform(source, srgb, mode, "RGB")
