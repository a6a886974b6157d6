"""Property-based fuzzing (hypothesis) of what reads untrusted input: image bytes
(`decode_image`), weights files (`load_state_dict`, `load_pretrained`) and config overrides
(`configs.common.check_overrides` + ml_collections' `--config.a.b=v` parsing, as train.py).

Each property says what may come out: a uint8 RGB image or `ImageDecodeError`; weights or a
`ValueError`/`FileNotFoundError` naming the file; a one-line override error. Anything else
(another exception type, a hang) fails. The runs are derandomized and keep no example
database, so CI sees the same examples every time; `--hypothesis-show-statistics` prints how
many each test ran.

What this found in zoo (all fixed): Pillow raising RuntimeError (AVIF), NotImplementedError
(DDS, BLP), TypeError (TIFF, IM) and AttributeError (SPIDER) on corrupt files, which
`decode_image` let through (a training run's worker would die); raw `UnpicklingError`,
`SafetensorError`, `BadZipFile`, numpy's pickle refusal and `TypeError`/`AttributeError` from
weights files, none naming the file.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import runpy
import signal
import struct

import numpy as np
import pytest
import torch
from absl import flags
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from ml_collections import ConfigDict, config_flags
from PIL import Image, features
from safetensors.torch import save as save_safetensors

import zoo
from configs.common import check_overrides
from zoo.data.decode import MAX_ASPECT_RATIO, ImageDecodeError, decode_image

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs/default.py")
FUZZ = settings(
    max_examples=150,
    deadline=None,  # the first example of each test pays for imports and compilation
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises `Hang` in the main thread when the block runs longer than `seconds`."""

    def interrupt(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------ image bytes


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def seed_images() -> dict[str, bytes]:
    """Small valid files of many formats and modes, the starting points of mutations."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = {
        "jpeg": encode(rgb, "JPEG", exif=exif),
        "cmyk.jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "png": encode(rgb.convert("P"), "PNG", transparency=0),
        "png16": encode(Image.fromarray(np.arange(192, dtype=np.uint16).reshape(12, 16)), "PNG"),
        "gif": encode(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.convert("P")]),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgb, "TIFF", compression="tiff_lzw"),
        "la.tiff": encode(rgb.convert("LA"), "TIFF"),
        "float.tiff": encode(Image.fromarray(np.ones((12, 16), np.float32)), "TIFF"),
        "ico": encode(rgb, "ICO"),
        "ppm": encode(rgb, "PPM"),
        "pcx": encode(rgb, "PCX"),
        "tga": encode(rgb, "TGA", compression="tga_rle"),
        "sgi": encode(rgb, "SGI"),
        "im": encode(rgb, "IM"),
        "dds": encode(rgb.convert("RGBA"), "DDS"),
        "qoi": encode(rgb, "QOI"),
        "blp": encode(rgb.convert("P"), "BLP"),
        "spider": encode(rgb.convert("F"), "SPIDER"),
    }
    for fmt, feature in (("WEBP", "webp"), ("AVIF", "avif"), ("JPEG2000", "jpg_2000")):
        if features.check(feature):
            seeds[fmt.lower()] = encode(rgb, fmt)
    return seeds


SEEDS = seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    """A seed image truncated, with bytes overwritten, or its header with random bytes after."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    kind = draw(st.sampled_from(["truncate", "flip", "header"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for position, value in draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8)
        ):
            data[position] = value
        return bytes(data)
    return bytes(data[: draw(st.integers(1, 32))]) + draw(st.binary(max_size=512))


def check_decode(data: bytes) -> None:
    """decode_image gives a uint8 RGB image within the size limits, or ImageDecodeError."""
    with time_limit(20):
        try:
            image = decode_image(data)
        except ImageDecodeError as e:
            assert str(e)
            event(f"ImageDecodeError: {str(e).split(':')[0][:30]}")
            return
    event("decoded")
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 1, image.shape
    height, width = image.shape[:2]
    assert height * width <= Image.MAX_IMAGE_PIXELS
    assert max(height, width) <= MAX_ASPECT_RATIO * min(height, width)


@FUZZ
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\xff\xd8\xff")
@example(b"\x89PNG\r\n\x1a\n")
def test_decode_random_bytes(data):
    check_decode(data)


@settings(FUZZ, max_examples=600)  # ~1 ms each; about 1 in 300 hit a non-OSError before
@given(mutated_images())
def test_decode_mutated_images(data):
    check_decode(data)


def test_seed_images_decode():
    for name, data in SEEDS.items():
        assert decode_image(data).shape in {(12, 16, 3), (16, 12, 3)}, name  # EXIF: rotated


def test_decoder_errors_found_by_fuzzing():
    """Files from the fuzzer's findings, each rebuilt from a seed. Pillow 13 raises
    NotImplementedError (BLP, DDS), TypeError (TIFF, IM) or AttributeError (SPIDER) on them;
    decode_image makes each an ImageDecodeError naming the cause."""

    def patched(name: str, offset: int, value: bytes) -> bytes:
        data = bytearray(SEEDS[name])
        data[offset : offset + len(value)] = value
        return bytes(data)

    spider = SEEDS["spider"]
    header = list(struct.unpack("<27f", spider[:108]))
    header[26] = 1.0
    cases = {
        "BLPFormatError": patched("blp", 8, b"\x67"),  # unknown encoding 103
        "NotImplementedError": patched("dds", 80, bytes(4)),  # pixel format flags 0
        "TypeError": patched("la.tiff", 72, b"\x05"),  # a RATIONAL where an offset goes
        "AttributeError": struct.pack("<27f", *header) + spider[108:],
    }
    for cause, data in cases.items():
        with pytest.raises(ImageDecodeError, match=f"^{cause}: "):
            decode_image(data)
    with pytest.raises(ImageDecodeError, match="^TypeError: "):  # a float image size
        decode_image(SEEDS["im"].replace(b"16*12", b"16*1.2", 1))


# ------------------------------------------------------------------------------ weights files

WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")


def seed_weights() -> dict[str, bytes]:
    """Valid small weights files of each format (a conv kernel, a bias, an integer)."""
    state = {
        "conv.weight": torch.arange(108.0).reshape(4, 3, 3, 3),
        "fc.bias": torch.arange(5.0),
        "steps": torch.tensor(3),
    }
    zipped, legacy, npz = io.BytesIO(), io.BytesIO(), io.BytesIO()
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    np.savez(npz, **{name: value.numpy() for name, value in state.items()})
    return {
        "torch zip": zipped.getvalue(),
        "torch legacy": legacy.getvalue(),
        "safetensors": save_safetensors(state),
        "npz": npz.getvalue(),
    }


WEIGHT_SEEDS = seed_weights()


@st.composite
def weights_bytes(draw) -> bytes:
    """Random bytes, or a valid weights file truncated or with bytes overwritten."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=1024))
    data = bytearray(WEIGHT_SEEDS[draw(st.sampled_from(sorted(WEIGHT_SEEDS)))])
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for position, value in draw(
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8)
    ):
        data[position] = value
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@FUZZ
@given(extension=st.sampled_from(WEIGHT_EXTENSIONS), data=weights_bytes())
def test_weights_files_load_or_name_the_file(scratch, extension, data):
    """load_state_dict reads the file or raises ValueError naming it; when it reads,
    load_pretrained converts it or raises ValueError naming it (the names fit no model)."""
    path = scratch / f"weights{extension}"
    path.write_bytes(data)
    with time_limit(20):
        try:
            state = zoo.load_state_dict(path)
        except ValueError as e:
            assert str(path) in str(e), str(e)
            event("ValueError naming the file")
            return
    event("loaded")
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
    with pytest.raises(ValueError, match=f"weights in {path} do not fit 'resnet18'"):
        zoo.load_pretrained("resnet18", path, input_size=32)


def test_weight_seeds_load(tmp_path):
    for name, data in WEIGHT_SEEDS.items():
        extension = ".npz" if name == "npz" else ".safetensors" if "safe" in name else ".pth"
        path = tmp_path / f"{name.replace(' ', '_')}{extension}"
        path.write_bytes(data)
        state = zoo.load_state_dict(path)
        assert sorted(state) == ["conv.weight", "fc.bias", "steps"], name
        np.testing.assert_array_equal(state["fc.bias"], np.arange(5.0, dtype=np.float32))


# ------------------------------------------------------------------------------ config overrides


def config_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ConfigDict):
            keys += config_keys(value, f"{prefix}{key}.")
    return keys


def default_config() -> ConfigDict:
    return runpy.run_path(DEFAULT_CONFIG)["get_config"]()


DEFAULT = default_config()
KEYS = config_keys(DEFAULT)
SECTIONS = {key for key in KEYS if isinstance(DEFAULT[key], ConfigDict)}  # model, evals.knn, ...
KEY_TEXT = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz_.0123456789 -"), max_size=20)
VALUE_TEXT = st.one_of(
    st.text(max_size=20),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["True", "false", "()", "(1, 2)", "(0.5,)", "[1,", "{}", "None", "1e400"]),
)
# Overrides of fields, real or made up; a whole section is test_section_overrides_are_checked's.
OVERRIDES = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(sorted(set(KEYS) - SECTIONS)), KEY_TEXT),
        VALUE_TEXT,
    ).filter(lambda item: item[0] not in SECTIONS),
    min_size=1,
    max_size=3,
)


def argv_of(overrides) -> list[str]:
    return ["train.py"] + [f"--config.{key}={value}" for key, value in overrides]


def define_config_flag(argv: list[str]) -> flags.FlagValues:
    """What train.py does at import: define the locked --config flag, which already
    registers a flag for each override in argv."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, flag_values=values, lock_config=True, sys_argv=argv
    )
    return values


@FUZZ
@given(OVERRIDES)
@example([("data.mean", "(1,2")])  # a tuple's value: absl's flags.Error
@example([("checkpoint.keep", "three")])
@example([("optim.lr", "1e-3"), ("data.name", "folder:/tmp")])
def test_overrides_fail_only_with_one_line_errors(overrides):
    """train.py's promise: a bad override is found before training starts and is one line
    on stderr with exit status 2. That is check_overrides' message (train.py checks argv
    first), or a flags.Error while absl parses argv (train.py's parse_flags turns it into
    the same one line). Nothing may be raised where train.py defines the --config flag: that
    runs at import, outside app.run, and ends in a traceback. An override that parses keeps
    the config's keys and the type of each."""
    argv = argv_of(overrides)
    problem = check_overrides(argv, DEFAULT_CONFIG)
    if problem is not None:
        event("check_overrides' message")
        assert any(key in problem for key, _ in overrides), problem
        for _, value in overrides:  # a value may hold a newline; the message quotes it
            problem = problem.replace(value, "") if value else problem
        assert "\n" not in problem, problem
        return
    values = define_config_flag(argv)
    try:
        values(argv)  # what absl's app.run does (train.py: configs.common.parse_flags)
    except flags.Error as e:
        event("flags.Error")
        assert "--config." in str(e), str(e)
        return
    event("parsed")
    config = values.config
    assert config_keys(config) == KEYS
    for key, _ in overrides:
        kept = type(config[key]) is type(DEFAULT[key])
        assert kept or (type(DEFAULT[key]) is float and type(config[key]) is int), key


@pytest.mark.parametrize(
    "argv, section",
    [
        (["--config.model={}"], "model"),  # model.name gone: AttributeError in loop.run
        (["--config.optim={'lr': 'abc', 'bogus': 3}"], "optim"),  # past the lock and the types
        (["--config.model.name=resnet8", "--config.model={}"], "model"),  # FlagOrderError
    ],
)
def test_section_overrides_are_checked(argv, section):
    """A section (`model`, `optim`, `evals.knn`, ...) given a whole value on the command line
    replaces the locked ConfigDict: check_overrides must report it in one line, naming it."""
    problem = check_overrides(["train.py", *argv], DEFAULT_CONFIG)
    assert problem is not None and problem.count("\n") == 0
    assert f"'{section}'" in problem or f"--config.{section}=" in problem
