"""Image decoding with Pillow: any file a camera or a dataset may hold -> uint8 RGB [H, W, 3].

Grayscale (L, 1-bit), 16-bit (I;16, I), RGBA/LA (composited on white), palette (P), CMYK and
YCbCr images all become RGB, and the EXIF orientation tag is applied, so a photo taken with
the camera on its side is upright (`PIL.ImageOps.exif_transpose`).

    image = decode_image(pathlib.Path("cat.jpg").read_bytes())   # uint8 [H, W, 3]

A file Pillow cannot read (corrupt, truncated, empty, not an image) raises `ImageDecodeError`;
the sources catch it and skip the file (zoo/data/sources.py).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A truncated JPEG must be an error, not a silently grey-filled image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """The bytes are not a readable image."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode == "P":  # a palette may carry transparency: go through RGBA
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, GIF, BMP, TIFF, WebP, ...) -> uint8 RGB [H, W, 3].

    Raises:
      ImageDecodeError: the bytes are empty, truncated, corrupt or not an image.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "corrupt EXIF data": the pixels are fine
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes now, so truncation is detected here
                image = ImageOps.exif_transpose(image)
                return np.asarray(_to_rgb(image), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from None
