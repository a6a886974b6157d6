"""Bad configs stop train.py with exit status 2 and one line naming the key, the value and a
fix, before anything is compiled.

Most cases run in-process: override problems through `configs.common.check_overrides` (what
train.py runs before absl parses the flags), the rest through `loop.run` with the train
state's and the train step's compilation replaced by a failure, so a check that comes too late
fails the test instead of compiling. A few cases run train.py itself for the exit status.
"""

import pathlib
import re
import subprocess
import sys

import pytest

from configs import common, default
from zoo.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs/default.py")


class Compiled(Exception):
    """Raised where `loop.run` would compile: a config check came too late."""


@pytest.fixture
def no_compilation(monkeypatch):
    def compiled(*args, **kwargs):
        raise Compiled("compiled before the config was rejected")

    monkeypatch.setattr(loop, "init_state", compiled)
    monkeypatch.setattr(loop.Parallel, "compile_train_step", compiled)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config.optim.lrr=0.1"], r"unknown config key 'optim.lrr'.*did you mean: optim.lr\b"),
        (
            ["--config.data.batch_size=abc"],
            r"config key 'data.batch_size' takes an integer, not 'abc' \(e.g. "
            r"--config.data.batch_size=32\)",
        ),
        (["--config.optim.lr=fast"], r"--config.optim.lr=fast: .*'optim.lr' takes a number"),
        (["--config.seed=1.5"], r"'seed' takes an integer, not '1.5'"),
        (["--config.total_steps=1e3"], r"'total_steps' takes an integer, not '1e3'"),
        (["--config.data.download=maybe"], r"'data.download' takes true or false"),
        (
            ["--config.total_steps=2", "--config=configs/default.py"],
            r"--config.total_steps=2 comes before --config=configs/default.py: put --config=FILE",
        ),
        (["--config=configs/defalt.py"], r"'configs/defalt.py' not found; did you mean: .*default"),
        (["--config=configs/__init__.py"], r"has no get_config\(\)"),
        (["--config=configs"], r"'configs' is a folder"),
        (["--config=README.md"], r"'README.md' is not Python"),
    ],
)
def test_bad_override_or_config_file_is_one_message(argv, message, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the working directory
    problem = common.check_overrides(["train.py", *argv], DEFAULT_CONFIG)
    assert problem is not None and "\n" not in problem
    assert re.search(message, problem), problem


def test_good_overrides_pass(monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["train.py", "--config=configs/binary_footwear.py", "--config.method.threshold=0.3"]
    argv += ["--config.data.download=false", "--config.optim.lr=1", "--config.data.mean=(0.5,)"]
    assert common.check_overrides(argv, DEFAULT_CONFIG) is None


BINARY = {"data.name": "fashion_mnist_mini_footwear"}
# (overrides of configs/default.py, the error, a fragment of its message)
BAD_CONFIGS = [
    ({"model.name": "resnt8"}, ValueError, r"unknown model 'resnt8'; did you mean: resnet8"),
    ({"data.name": "fashion_mnst"}, ValueError, r"unknown dataset 'fashion_mnst'; did you mean"),
    ({"method.name": "supervisd"}, ValueError, r"unknown method 'supervisd'; did you mean"),
    (
        {"optim.name": "adam"},
        ValueError,
        r"optim.name must be one of .*'adam'; did you mean: adamw",
    ),
    ({"schedule.name": "cosin"}, ValueError, r"schedule.name .* got 'cosin'; did you mean: cosine"),
    ({"evals.names": "clasification"}, ValueError, r"unknown evaluator 'clasification'; did you"),
    (
        {"data.train_ops": "random_crop(padding=2)|flipp"},
        ValueError,
        r"data.train_ops=.*unknown transform 'flipp'; did you mean: flip",
    ),
    (
        {"data.eval_ops": "resize_centre_crop(size=28)"},
        ValueError,  # eval ops run only at the first evaluation: checked before training
        r"data.eval_ops=.*unknown transform 'resize_centre_crop'; did you mean: resize_center",
    ),
    (
        {"data.train_ops": "random_crop(padding=x)|flip"},
        ValueError,
        r"data.train_ops=.*cannot parse transform 'random_crop\(padding=x\)'.*literal values",
    ),
    (
        {"data.train_ops": "random_crop(pad=2)|flip"},
        ValueError,
        r"'random_crop' has no argument 'pad'; did you mean padding\? it takes padding=4, size",
    ),
    (
        {"data.train_ops": "random_crop(padding=2|flip"},
        ValueError,
        r"cannot parse transform 'random_crop\(padding=2'",
    ),
    (
        {"data.train_ops": "random_crop(padding='2')"},
        ValueError,
        r"'random_crop': padding takes int, got '2'",
    ),
    (
        {"data.train_ops": "random_crop(padding=-40)"},
        ValueError,
        r"'random_crop': padding must be >= 0, got -40",
    ),
    (
        {"data.eval_ops": "center_crop(sz=28)"},
        ValueError,
        r"data.eval_ops=.*'center_crop' has no argument 'sz'; did you mean size",
    ),
    (
        {"data.batch_size": 100},  # conftest.py: 8 CPU devices
        ValueError,
        r"data.batch_size=100 does not divide over the 8 device\(s\) \(8\): set "
        r"data.batch_size to a multiple of 8, e.g. 96 or 104",
    ),
    ({"data.batch_size": 0}, ValueError, r"data.batch_size must be > 0 .*got 0"),
    ({"data.batch_size": -32}, ValueError, r"data.batch_size must be > 0 .*got -32"),
    ({"data.eval_batch_size": 0}, ValueError, r"data.eval_batch_size must be > 0"),
    ({"optim.lr": -0.1}, ValueError, r"optim.lr must be a finite number >= 0, got -0.1"),
    ({"optim.lr": float("nan")}, ValueError, r"optim.lr must be a finite number >= 0, got nan"),
    ({"total_steps": -5}, ValueError, r"total_steps=-5, .*set total_steps > 0"),
    ({"num_epochs": 0.0}, ValueError, r"total_steps=0 and num_epochs > 0"),
    ({"checkpoint.every_steps": 0}, ValueError, r"checkpoint.every_steps must be > 0"),
    ({"checkpoint.keep": 0}, ValueError, r"checkpoint.keep must be > 0"),
    ({"logging.every_steps": 0}, ValueError, r"logging.every_steps must be > 0"),
    ({"evals.every_steps": -1}, ValueError, r"evals.every_steps must be >= 0"),
    ({"model.dtype": "float64"}, ValueError, r"model.dtype must be one of float32, .*'float64'"),
    ({"model.stem": "cifr"}, ValueError, r"model 'resnet8': stem must be .*got 'cifr'"),
    (
        {"model.name": "vit_tiny_patch16_224", "model.patch_size": 5},
        ValueError,
        r"model 'vit_tiny_patch16_224' cannot take the 28x28 training images of "
        r"fashion_mnist_mini: patch_size=5 does not divide the 28x28 input; patch sizes that "
        r"do: 2, 4, 7, 14, 28",
    ),
    (
        {"model.name": "swin_tiny_patch4_window7_224", "data.eval_ops": "resize(size=30)"},
        ValueError,
        r"cannot take the 30x30 eval images .*patch_size=4 does not divide",
    ),
    (
        {"model.name": "convnext_atto"},
        ValueError,
        r"ConvNeXt needs inputs of at least 32x32 .*got 28x28",
    ),
    ({**BINARY, "method.threshold": 1.5}, ValueError, r"method.threshold=1.5 must be in \(0, 1\)"),
    ({**BINARY, "method.threshold": 0.0}, ValueError, r"method.threshold=0.0 must be in \(0, 1\)"),
    (
        {"method.label_smoothing": 1.0},
        ValueError,
        r"method.label_smoothing=1.0 must be in \[0, 1\)",
    ),
    (
        {"init_from": "/nonexistent/model.safetensors"},
        FileNotFoundError,
        r"init_from=/nonexistent/model.safetensors is neither a zoo workdir nor a file",
    ),
    (
        {"init_from": "weights.pth", "init_from_model": "resnt50"},
        ValueError,
        r"init_from_model: unknown model 'resnt50'",
    ),
    (
        {**BINARY, "data.mixup_alpha": 0.8},
        ValueError,
        r"is binary; mixup/cutmix .* need a multiclass dataset",
    ),
]


@pytest.mark.parametrize(
    "overrides, error, message", BAD_CONFIGS, ids=[str(case[0]) for case in BAD_CONFIGS]
)
def test_bad_config_fails_before_compilation(overrides, error, message, tmp_path, no_compilation):
    config = default.get_config()
    for key, value in overrides.items():
        *sections, field = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[field] = value
    with pytest.raises(error, match=message) as raised:
        loop.run(config, tmp_path / "run")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "name", ["default", "binary_footwear", "multilabel_mosaic", "dino_fashion_mnist_mini"]
)
def test_shipped_configs_pass_the_checks(name, tmp_path, no_compilation):
    config = common.load_config_file(str(ROOT / f"configs/{name}.py"))
    with pytest.raises(Compiled):  # every check passed: the run got to compiling
        loop.run(config, tmp_path)


def train(*args, tmp_path):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--workdir={tmp_path}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (  # absl's flag parsing: check_overrides
            ["--config.data.batch_size=abc"],
            "train.py: --config.data.batch_size=abc: config key 'data.batch_size' takes an "
            "integer, not 'abc'",
        ),
        (  # a ValueError out of loop.run
            ["--config.model.name=vit_tiny_patch16_224", "--config.model.patch_size=5"],
            "train.py: model 'vit_tiny_patch16_224' cannot take the 28x28 training images",
        ),
        (["stray"], "train.py: unexpected arguments ['stray']"),  # absl: parse_flags
    ],
)
def test_train_py_exits_2_with_one_message(args, message, tmp_path):
    result = train(*args, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr and "FATAL" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # the message (+ ZOO_TRACEBACK hint)
    assert "zoo:" not in result.stdout  # stopped before the state was made
