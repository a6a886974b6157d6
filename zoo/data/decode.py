"""Image decoding with Pillow: any file a camera or a dataset may hold -> uint8 RGB [H, W, 3].

Grayscale (L, 1-bit), 16-bit (I;16, I), float (F), RGBA/LA (composited on white), palette
(P, with transparency), CMYK and YCbCr images all become RGB, the EXIF orientation tag is
applied, so a photo taken with the camera on its side is upright (`PIL.ImageOps.exif_transpose`),
and an animated GIF/WebP or a multi-page TIFF gives its first frame.

    image = decode_image(pathlib.Path("cat.jpg").read_bytes())   # uint8 [H, W, 3]
    image = decode_file("cat.jpg")                                 # the same, from the path

A file Pillow cannot read (corrupt, truncated, empty, not an image) raises `ImageDecodeError`
(and, from `decode_file`, a path that is no file: missing, a broken link, a folder), whatever
the process set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` to (zoo turns it off for its own decodes
only, `_truncated_images_refused`); so does an image larger than Pillow's decompression-bomb
limit (`PIL.Image.MAX_IMAGE_PIXELS`, which zoo never switches off: Pillow itself only warns
between 1x and 2x the limit, zoo refuses the whole range) or one with an aspect ratio beyond
`MAX_ASPECT_RATIO`:1. The folder source skips such a file and logs its path
(zoo/data/sources.py); `zoo.inference.load_image` raises a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A 1x20000 PNG is 20,000 pixels, far below the bomb limit, yet resizing its short side to
# 256 (ImageNet eval preprocessing) makes a 256x5,120,000 image, gigabytes of memory. No
# photo is 100 times longer than wide, so such a file is refused like a bomb.
MAX_ASPECT_RATIO = 100


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (or one too large to decode safely)."""


def check_size(width: int, height: int) -> None:
    """Refuses an image larger than `PIL.Image.MAX_IMAGE_PIXELS` or with an aspect ratio
    beyond `MAX_ASPECT_RATIO` (see the module docstring).

    Raises:
      ImageDecodeError: saying which limit and the image's size.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageDecodeError(
            f"image of {width}x{height} = {width * height:,} {_too_large(limit)}"
        )
    if min(width, height) > 0 and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(
            f"image of {width}x{height} pixels has an aspect ratio beyond {MAX_ASPECT_RATIO}:1; "
            "resizing it to a model's input would take gigabytes"
        )


def _too_large(limit: int) -> str:
    return (
        f"pixels is larger than the limit of {limit:,} pixels (PIL.Image.MAX_IMAGE_PIXELS): a "
        "possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
    )


_truncation_lock = threading.Lock()
_decoding = 0  # decodes in progress (all threads)
_saved_setting = False  # Pillow's LOAD_TRUNCATED_IMAGES outside them


@contextlib.contextmanager
def _truncated_images_refused() -> Iterator[None]:
    """Pillow's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES` False during zoo's decodes (a
    truncated JPEG must be an error, not a silently grey-filled image) and the caller's value
    again once the last one in any thread ends. Pillow reads the setting while it opens (PNG
    chunks) and loads, so the whole decode runs inside; other threads see False meanwhile."""
    global _decoding, _saved_setting
    with _truncation_lock:
        if _decoding == 0:
            _saved_setting = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _decoding += 1
    try:
        yield
    finally:
        with _truncation_lock:
            _decoding -= 1
            if _decoding == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_setting


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16/32-bit grey: to 8 bits
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8))
    elif image.mode == "F":  # as Pillow's own F -> L: values clipped to [0, 255]
        array = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if image.mode == "P":  # a palette may carry transparency: go through RGBA
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, GIF, BMP, TIFF, WebP, ...) -> uint8 RGB [H, W, 3].

    Raises:
      ImageDecodeError: the bytes are empty, truncated, corrupt or not an image, or the image
        is beyond the size limits (see `check_size`).
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings(), _truncated_images_refused():
            # e.g. "corrupt EXIF data": the pixels are fine. Pillow's DecompressionBombWarning
            # (1x-2x the limit) is ignored too: check_size refuses those images before load.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                check_size(*image.size)
                image.load()  # decodes now, so truncation is detected here
                image = ImageOps.exif_transpose(image)
                return np.asarray(_to_rgb(image), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:  # its message names a BytesIO, not the file
        raise ImageDecodeError("not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as e:  # > 2x the limit: Pillow refuses it in open()
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(pixels.group(1)):,}" if pixels else "over twice as many"
        raise ImageDecodeError(f"image of {count} {_too_large(Image.MAX_IMAGE_PIXELS)}") from None
    except Exception as e:  # noqa: BLE001 - see below
        # Pillow's decoders raise more than OSError on corrupt bytes: RuntimeError (AVIF),
        # NotImplementedError (DDS, BLP), TypeError (TIFF, IM), AttributeError (SPIDER), ...
        # (tests/test_fuzz.py). Whatever it is, the file is not a readable image.
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from None


def decode_file(path: str | os.PathLike) -> np.ndarray:
    """`decode_image` of a file's bytes.

    Raises:
      ImageDecodeError: as `decode_image`, or saying why the file cannot be read (no such
        file, a broken symbolic link, a directory, no permission); the caller adds the path.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageDecodeError(f"broken symbolic link to {os.readlink(path)}") from None
        raise ImageDecodeError("no such file") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory, not an image") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read the file ({e.strerror or e})") from None
    return decode_image(data)
