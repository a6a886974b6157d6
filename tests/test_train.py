"""End to end: train.py on the embedded dataset writes its outputs (bad configs:
tests/test_bad_configs.py; interruptions and divergence: tests/test_reliability.py)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from test_imports import FAULT_PROBE, GLIBC_DEFAULTS, REUSE, run_python  # tests/ is on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A few steps of a tiny ResNet on the embedded dataset: checkpoints at steps 4, 8, 12.
SHORT_RUN = [
    "--config.model.name=resnet8",
    "--config.total_steps=12",
    "--config.data.batch_size=16",
    "--config.data.eval_batch_size=1000",
    "--config.checkpoint.every_steps=4",
    "--config.evals.every_steps=6",
    "--config.logging.every_steps=2",
]


def train(workdir, *args, wait=True):
    env = {**os.environ, "XLA_FLAGS": ""}  # one device, like a user's laptop
    command = [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", *SHORT_RUN, *args]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def tensorboard_scalars(path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} from a TensorBoard event file (TFRecord framing: length, its
    CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, scalars, at = pathlib.Path(path).read_bytes(), {}, 0
    while at < len(data):
        length = int.from_bytes(data[at : at + 8], "little")
        event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_metric_writer_does_not_import_torch(tmp_path):
    # tensorboardX imports torch when installed (seconds and ~600 MB); zoo's writer hides it
    # for that import only: torch stays importable afterwards.
    code = (
        "import importlib.util, sys; from zoo.training import metrics; "
        f"w = metrics.MetricWriter({str(tmp_path)!r}); w.write(3, 'train', {{'loss': 0.5}}); "
        "w.close(); print('torch imported', 'torch' in sys.modules); "
        "spec = importlib.util.find_spec('torch'); "
        "print('torch importable', spec is None or __import__('torch') is sys.modules['torch'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "torch imported False" in result.stdout and "torch importable True" in result.stdout
    (events_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert tensorboard_scalars(events_file) == {("train/loss", 3): 0.5}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    output = train(workdir)
    return workdir, output


def test_short_run_writes_checkpoints_metrics_and_plots(uninterrupted):
    workdir, output = uninterrupted
    assert "final eval on 2000 images" in output
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8, 12]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and evals[-1]["count"] == 2000
    assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss"]) for r in records)
    for png in ("curves.png", "confusion_matrix.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (events_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    scalars = tensorboard_scalars(events_file)
    for r in records:  # TensorBoard has what metrics.jsonl has (as float32)
        for key in ("loss", "accuracy"):
            assert scalars[(f"{r['split']}/{key}", r["step"])] == pytest.approx(r[key], rel=1e-6)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 12 and summary["eval_count"] == 2000
    assert summary["freed_memory_kept"] is False  # without train.py --keep_freed_memory


TRAIN_WITH_A_PROBE = """
import json, sys, types
from absl import app
import train
from zoo.cpu import allocator

keep_freed_memory = allocator.keep_freed_memory
def before_jax():
    assert "jax" not in sys.modules, "train.py set glibc after importing JAX"
    return keep_freed_memory()
allocator.keep_freed_memory = before_jax
# In place of the training loop (train.py imports it after the allocator): glibc's behaviour.
loop = types.ModuleType("zoo.training.loop")
loop.RunFailed = RuntimeError
loop.run = lambda config, workdir: print("RESULT " + json.dumps([allocator.kept, page_faults()]))
sys.modules["zoo.training.loop"] = loop
sys.argv = ["train.py", *sys.argv[1:]]
app.run(train.main, flags_parser=train.parse_flags)
"""


@pytest.mark.parametrize("keep", [False, True])
def test_keep_freed_memory_flag_reaches_glibc_before_jax(keep):
    # An arena is tied to a thread at its first allocation: glibc must be set before JAX starts.
    flags = ["--keep_freed_memory"] if keep else []
    kept, faults = run_python(FAULT_PROBE + TRAIN_WITH_A_PROBE, *flags)
    assert kept is keep
    if sys.platform.startswith("linux"):
        assert (max(faults[2:]) < REUSE) if keep else (min(faults[2:]) > GLIBC_DEFAULTS), faults
