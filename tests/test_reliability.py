"""Reliability: a diverged model is never scored as right, evaluation and prediction share one
threshold rule, damaged checkpoints are found and skipped, non-finite updates stop (or are
skipped), and a run interrupted by SIGKILL or SIGTERM at any moment ends bitwise equal to an
uninterrupted one."""

import dataclasses
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from zoo.inference import decide
from zoo.methods.supervised import supervised
from zoo.training.checkpoint import Checkpointer, CheckpointError
from zoo.training.evaluate import metrics_from_totals, ranking_scores
from zoo.training.state import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]
BAD = [np.nan, np.inf, -np.inf]


def eval_totals(task, logits, labels, threshold=0.5):
    """Host totals, scores and labels of one batch, as `evaluate` collects them."""
    num_outputs = logits.shape[-1]
    method = supervised(None, num_outputs, task=task, threshold=threshold)
    batch = {"label": jnp.asarray(labels), "mask": jnp.ones(len(labels), jnp.float32)}
    sums = jax.device_get(jax.jit(method.eval_sums)(jnp.asarray(logits, jnp.float32), batch))
    per_example = sums.pop("per_example", None)
    if per_example is None:
        return sums, None, None
    return sums, ranking_scores(per_example), per_example["label"]


@pytest.mark.parametrize("bad", BAD)
def test_nonfinite_multiclass_logits_are_never_correct(bad):
    # Example 0's label logit is the largest but another logit is bad; example 1 is all bad;
    # example 2 is fine and right. A rank "logits > label_logit" counts NaN as correct.
    logits = np.array([[5.0, bad, 1.0], [bad, bad, bad], [0.0, 3.0, 1.0]], np.float32)
    labels = np.array([0, 1, 1], np.int32)
    totals, _, _ = eval_totals("multiclass", logits, labels)
    results = metrics_from_totals(totals, None, None, "multiclass")
    assert results["accuracy"] == pytest.approx(1 / 3) and results["top5"] == pytest.approx(1 / 3)
    assert results["nonfinite"] == 2
    assert results["confusion"].sum() == 1  # only the finite example is placed


@pytest.mark.parametrize("bad", BAD)
def test_nonfinite_binary_logits_are_never_correct(bad):
    labels = np.array([1, 0, 1, 0], np.int32)
    logits = np.array([[bad], [bad], [4.0], [-4.0]], np.float32)  # two bad, two right
    totals, scores, truth = eval_totals("binary", logits, labels)
    results = metrics_from_totals(totals, scores, truth, "binary")
    assert results["accuracy"] == 0.5 and results["nonfinite"] == 2
    assert (results["precision"], results["recall"]) == (0.5, 0.5)  # tp 1, fp 1, fn 1
    np.testing.assert_array_equal(results["confusion"], [[1, 1], [1, 1]])
    # The bad positive ranks below every negative, the bad negative above every positive:
    # of the 4 (positive, negative) pairs only (4.0, -4.0) is ordered right.
    assert results["auc"] == pytest.approx(0.25)


@pytest.mark.parametrize("bad", BAD)
def test_nonfinite_multilabel_logits_are_never_correct(bad):
    labels = np.array([[1, 0], [0, 1], [1, 1]], np.uint8)
    logits = np.array([[bad, -3.0], [-3.0, bad], [3.0, 3.0]], np.float32)
    totals, scores, truth = eval_totals("multilabel", logits, labels)
    results = metrics_from_totals(totals, scores, truth, "multilabel")
    assert results["accuracy"] == pytest.approx(4 / 6) and results["exact_match"] == 1 / 3
    assert results["nonfinite"] == 2
    np.testing.assert_array_equal(totals["tp"] + totals["fn"], [2, 2])  # every positive counted
    assert totals["tp"].sum() == 2  # the bad ones are not true positives
    # Per class, the bad example is ranked worst: class 0 AP = (1/2)*(1/1) + (1/2)*(2/3).
    assert results["map"] == pytest.approx(np.mean([0.5 + 1 / 3, 0.5 * 1 + 0.5 * 2 / 3]))


@pytest.mark.parametrize("task", ["binary", "multilabel"])
@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.25])
def test_evaluation_and_prediction_decide_alike_at_the_threshold(task, threshold):
    # float32 logits straddling logit(threshold): both sides count "at or above" as positive.
    center = np.float32(np.log(threshold / (1 - threshold)))
    logits = center + np.arange(-50, 51, dtype=np.float32) * np.float32(1e-7)
    probabilities = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)))  # as zoo.inference does
    truth = np.zeros(len(logits), np.int32)
    method = supervised(None, 1, task=task, threshold=threshold)
    batch = {
        "label": jnp.asarray(truth if task == "binary" else truth[:, None]),
        "mask": jnp.ones(len(logits), jnp.float32),
    }
    false_positives = np.asarray(method.eval_sums(jnp.asarray(logits[:, None]), batch)["fp"])[0]
    if task == "binary":
        names = ["negative", "positive"]
        predicted = decide(np.stack([1 - probabilities, probabilities], -1), names, task, threshold)
        positives = sum(labels == ["positive"] for labels in predicted)
    else:
        predicted = decide(probabilities[:, None], ["a"], task, threshold)
        positives = sum(labels == ["a"] for labels in predicted)
    assert 0 < positives < len(logits)
    assert false_positives == positives
    assert positives == int(np.sum(probabilities >= np.float32(threshold)))


# --- damaged checkpoints (in-process, on a small real train state) -------------------------


class Position:
    """A data iterator's checkpointable position (what Checkpointer saves as `data`)."""

    def __init__(self, index=0):
        self.index = index

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def small_state(value: float) -> TrainState:
    # Random values: incompressible, so the kernel is the largest file of the checkpoint.
    kernel = jax.random.normal(jax.random.PRNGKey(int(value)), (3, 3, 32, 64)) + value
    params = {"conv": {"kernel": kernel}, "head": {"bias": jnp.ones(10)}}
    return TrainState(
        step=jnp.asarray(int(value), jnp.int32),
        params=params,
        model_state={"batch_stats": {"mean": jnp.full((8,), value)}},
        opt_state={"momentum": jax.tree.map(jnp.zeros_like, params)},
        extra={},
    )


def run_config(model="resnet8", method="supervised"):
    return ml_collections.ConfigDict({"model": {"name": model}, "method": {"name": method}})


@pytest.fixture
def three_checkpoints(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    for step in (4, 8, 12):
        checkpointer.save(step, small_state(step), Position(step * 10), run_config())
    checkpointer.close()
    return tmp_path


def largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The file holding the kernel's bytes."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=os.path.getsize)


def truncate(step_dir):
    path = largest_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(step_dir):
    path = largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A  # inside the kernel's values: TensorStore reads it without error
    path.write_bytes(bytes(data))


def delete_file(step_dir):
    largest_file(step_dir).unlink()


def remove_digest(step_dir):  # the digest item gone: the state's data cannot be checked
    for path in (step_dir / "digest").rglob("*"):
        if path.is_file():
            path.write_text("{not json")


def other_models_config(step_dir):
    (config_file,) = [p for p in (step_dir / "config").iterdir() if p.name == "metadata"]
    config = json.loads(config_file.read_text())
    config["model"]["name"] = "vit_tiny_patch16_224"
    config_file.write_text(json.dumps(config))


def corrupt_data_position(step_dir):
    (step_dir / "data" / "metadata").write_text('{"index": ')


DAMAGE = {
    "truncated array file": (truncate, "unusable"),
    "flipped bytes": (flip_bytes, "do not match the digest"),
    "missing array file": (delete_file, "unusable"),
    "unreadable digest": (remove_digest, "unusable"),
    "config of another model": (other_models_config, "model 'vit_tiny_patch16_224'"),
    "corrupt data position": (corrupt_data_position, "unusable"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    three_checkpoints, damage, capsys
):
    damage_fn, message = DAMAGE[damage]
    damage_fn(three_checkpoints / "checkpoints/12")
    checkpointer = Checkpointer(three_checkpoints, keep=3, async_save=False)
    position = Position()
    restored = checkpointer.restore(small_state(0), position, run_config())
    err = capsys.readouterr().err
    assert "checkpoint 12 is unusable" in err and message in err, err
    assert "resuming from the previous usable checkpoint, step 8" in err
    assert int(restored.step) == 8 and position.index == 80
    np.testing.assert_array_equal(
        restored.params["conv"]["kernel"], small_state(8).params["conv"]["kernel"]
    )
    # The damaged one is kept aside, out of orbax's way: step 12 can be written again.
    assert (three_checkpoints / "damaged_checkpoints/12").is_dir()
    checkpointer.save(12, small_state(12), position, run_config())
    checkpointer.close()
    assert sorted(checkpointer.manager.all_steps()) == [4, 8, 12]


def test_no_usable_checkpoint_stops_with_every_problem_named(three_checkpoints):
    truncate(three_checkpoints / "checkpoints/12")
    flip_bytes(three_checkpoints / "checkpoints/8")
    other_models_config(three_checkpoints / "checkpoints/4")
    checkpointer = Checkpointer(three_checkpoints, keep=3, async_save=False)
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore(small_state(0), Position(), run_config())
    message = str(error.value)
    assert "no usable checkpoint" in message and "another --workdir" in message
    for step in (12, 8, 4):
        assert f"step {step}: " in message
    # Nothing moved or deleted: a rerun must not start over silently either.
    assert sorted(int(p.name) for p in (three_checkpoints / "checkpoints").iterdir()) == [4, 8, 12]


def test_interrupted_write_is_ignored_and_removed(three_checkpoints, capsys):
    # What a kill mid-write leaves: orbax's temporary directory for the next step.
    partial = three_checkpoints / "checkpoints/16.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{")
    checkpointer = Checkpointer(three_checkpoints, keep=3, async_save=False)
    restored = checkpointer.restore(small_state(0), Position(), run_config())
    assert int(restored.step) == 12 and not partial.exists()
    assert "removing 1 incomplete checkpoint write(s)" in capsys.readouterr().err


# --- non-finite updates -------------------------------------------------------------------


def nan_when_flagged(base):
    """`base` method whose loss is NaN when the batch says so (its gradient stays finite)."""

    def loss(params, model_state, extra, batch, rng, **kwargs):
        value, aux = base.loss(params, model_state, extra, batch, rng, **kwargs)
        return jnp.where(jnp.any(batch["bad"]), jnp.nan, value), aux

    return dataclasses.replace(base, loss=loss)


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_step_is_skipped_or_applied(skip):
    import flax.linen as nn

    from zoo.training import step as step_lib

    class Tiny(nn.Module):
        num_classes: int = 3

        @nn.compact
        def __call__(self, x, *, train):
            x = nn.BatchNorm(use_running_average=not train)(x.reshape(len(x), -1))
            return nn.Dense(self.num_classes)(x)

    method = nan_when_flagged(supervised(Tiny(), 3))
    batch = {
        "image": jax.random.normal(jax.random.PRNGKey(0), (8, 2, 2, 1)),
        "label": jnp.arange(8) % 3,
        "bad": jnp.ones(8, bool),
    }
    params, model_state, _ = method.init(jax.random.PRNGKey(1), batch)
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState(jnp.int32(0), params, model_state, tx.init(params), {})
    mesh = step_lib.make_mesh(jax.devices()[:1])
    train = step_lib.compile_train_step(
        mesh,
        method=method,
        tx=tx,
        augment=lambda b, r, axis_name=None: b,
        schedule=lambda s: 0.1,
        skip_nonfinite=skip,
    )
    before = jax.device_get(state)
    after, metrics = train(state, batch, jax.random.PRNGKey(2))
    assert int(after.step) == 1 and np.isnan(metrics["loss"])
    # The loss is NaN while its gradient is 0 here: only the flag tells the step is bad.
    unchanged = [
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves((before.params, before.model_state, before.opt_state)),
            jax.tree.leaves(jax.device_get((after.params, after.model_state, after.opt_state))),
            strict=True,
        )
    ]
    assert all(unchanged) if skip else not all(unchanged)  # BatchNorm statistics moved


@pytest.fixture
def sometimes_nan_method():
    """A registered method: supervised, with a NaN loss on about 30% of the steps (decided by
    the step's loss rng, so a test can tell which)."""
    from zoo.methods import METHODS
    from zoo.methods import supervised as supervised_lib

    def build(config, model, spec, **kwargs):
        base = supervised_lib.build(config, model, spec, **kwargs)

        def loss(params, model_state, extra, batch, rng, **kw):
            value, aux = base.loss(params, model_state, extra, batch, rng, **kw)
            return jnp.where(is_bad(rng), jnp.nan, value), aux

        return dataclasses.replace(base, loss=loss)

    METHODS.register(build, name="sometimes_nan", metadata={"classifier": True})
    yield
    del METHODS._items["sometimes_nan"], METHODS._metadata["sometimes_nan"]


def is_bad(loss_rng):
    return jax.random.uniform(jax.random.fold_in(loss_rng, 7)) < 0.3


def bad_steps(seed, total_steps):
    """The 1-based steps whose loss is NaN, replaying train_step's rng: fold_in(step), split."""
    step_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
    bad = []
    for step in range(total_steps):
        loss_rng = jax.random.split(jax.random.fold_in(step_rng, step))[1]
        if is_bad(loss_rng):
            bad.append(step + 1)
    return bad


def tiny_run_config(**changes):
    from configs.default import get_config

    config = get_config()
    config.model.name = "resnet8"
    config.total_steps = 12
    config.data.batch_size = 16
    config.checkpoint.every_steps = 4
    config.logging.every_steps = 3
    config.evals.names = ""
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def test_skipped_nonfinite_updates_are_counted_and_the_run_finishes(sometimes_nan_method, tmp_path):
    from zoo.training import loop

    expected = bad_steps(0, 12)
    assert 2 <= len(expected) <= 8 and max(np.diff(expected), default=2) < 12  # a real test
    config = tiny_run_config(**{"method.name": "sometimes_nan", "optim.skip_nonfinite": True})
    loop.run(config, tmp_path / "skip")
    summary = json.loads((tmp_path / "skip/summary.json").read_text())
    assert summary["step"] == 12 and summary["skipped_nonfinite_updates"] == len(expected)
    records = [json.loads(x) for x in (tmp_path / "skip/metrics.jsonl").read_text().splitlines()]
    for record in records:  # the logged loss averages the applied steps only
        assert np.isfinite(record["loss"])
    # Without skipping, the first bad step stops the run, naming it.
    config = tiny_run_config(**{"method.name": "sometimes_nan"})
    with pytest.raises(loop.RunFailed, match=f"diverged at step {expected[0]}: loss nan"):
        loop.run(config, tmp_path / "stop")


def test_absurd_learning_rate_stops_with_the_last_checkpoint_intact(tmp_path):
    # A run checkpoints at step 4; resumed with lr 1e30 it diverges: exit 1, the message, and
    # checkpoint 4 byte for byte as it was.
    result = train(tmp_path, "--config.total_steps=4")
    assert result.returncode == 0, result.stdout
    checkpoint = tmp_path / "checkpoints/4"
    before = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    result = train(tmp_path, "--config.optim.lr=1e30", "--config.total_steps=40")
    assert result.returncode == 1, result.stdout
    assert "the run diverged at step" in result.stderr and "loss nan" in result.stderr
    assert f"The last checkpoint, step 4 in {tmp_path / 'checkpoints'}, is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == before


# --- interruptions: SIGKILL and SIGTERM at random moments ---------------------------------

# A tiny ResNet on the embedded data, checkpointing every 4 of 64 steps, no evaluation.
INTERRUPTED_RUN = [
    "--config.model.name=resnet8",
    "--config.total_steps=64",
    "--config.data.batch_size=16",
    "--config.checkpoint.every_steps=4",
    "--config.logging.every_steps=2",
    "--config.evals.names=",
]


def environment(devices=1):
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return {**os.environ, "XLA_FLAGS": flags}


def train(workdir, *args, devices=1, wait=True):
    command = [sys.executable, "train.py", f"--workdir={workdir}", *INTERRUPTED_RUN, *args]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, with grain's workers
    )
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def logged_steps(workdir) -> int:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def interrupt(workdir, how, rng, args, devices):
    """Starts the run, waits until it trains, then: "kill" (SIGKILL after a random delay),
    "kill-during-write" (SIGKILL as soon as a checkpoint is being written), "term" (SIGTERM
    after a random delay). Returns (what happened, the process's output)."""
    start_lines = logged_steps(workdir)
    checkpoints = pathlib.Path(workdir) / "checkpoints"
    earlier = set(checkpoints.glob("*.orbax-checkpoint-tmp*"))  # left by an earlier kill

    def new_partial_checkpoints():
        return set(checkpoints.glob("*.orbax-checkpoint-tmp*")) - earlier

    process = train(workdir, *args, devices=devices, wait=False)
    deadline = time.time() + 300
    while logged_steps(workdir) == start_lines and process.poll() is None:
        assert time.time() < deadline, "the run did not start training"
        time.sleep(0.01)
    if process.poll() is not None:  # finished before the interruption
        return "finished", process.communicate(timeout=60)
    if how == "kill-during-write":
        while process.poll() is None and not new_partial_checkpoints():
            time.sleep(0.0005)
    else:
        time.sleep(rng.uniform(0.0, 1.0))
    mid_write = bool(new_partial_checkpoints())
    # To the whole group, as a preemption or Ctrl-C does (grain's workers hold the pipes).
    os.killpg(process.pid, signal.SIGTERM if how == "term" else signal.SIGKILL)
    output = process.communicate(timeout=300)
    if how == "term":
        assert process.returncode == 0, output
        assert "stopped by SIGTERM at step" in output[0] and "Run the same command" in output[0]
        return "term", output
    return ("killed mid-write" if mid_write else "killed"), output


def final_state(workdir, step=64):
    path = pathlib.Path(workdir) / f"checkpoints/{step}/state"
    state = ocp.StandardCheckpointer().restore(path.absolute())
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state)
    }


def check_interrupted_run_equals_uninterrupted(tmp_path, plan, *, devices, workers, seed):
    args = [f"--config.data.num_workers={workers}"]
    reference = train(tmp_path / "reference", *args, devices=devices)
    assert reference.returncode == 0, reference.stderr
    rng, happened = random.Random(seed), []
    for how in plan:
        what, _ = interrupt(tmp_path / "run", how, rng, args, devices)
        happened.append(what)
    result = train(tmp_path / "run", *args, devices=devices)
    assert result.returncode == 0, result.stderr
    got, want = final_state(tmp_path / "run"), final_state(tmp_path / "reference")
    assert got.keys() == want.keys()
    for key in want:  # params, BatchNorm statistics, optimizer state, step: bit for bit
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    return happened


def test_sigkill_and_sigterm_at_random_moments_8_devices_2_workers(tmp_path):
    plan = ["kill-during-write", "term"]
    happened = check_interrupted_run_equals_uninterrupted(
        tmp_path, plan, devices=8, workers=2, seed=0
    )
    assert happened == ["killed mid-write", "term"], happened


@pytest.mark.slow
@pytest.mark.parametrize("devices, workers", [(1, 0), (1, 2), (8, 0), (8, 2)])
def test_five_sigkills_then_resume_equals_uninterrupted(tmp_path, devices, workers):
    plan = ["kill", "kill-during-write", "kill", "kill-during-write", "kill"]
    happened = check_interrupted_run_equals_uninterrupted(
        tmp_path, plan, devices=devices, workers=workers, seed=devices + workers
    )
    assert "finished" not in happened and happened.count("killed mid-write") >= 1, happened


@pytest.mark.slow
def test_five_sigterms_then_resume_equals_uninterrupted(tmp_path):
    happened = check_interrupted_run_equals_uninterrupted(
        tmp_path, ["term"] * 5, devices=1, workers=2, seed=5
    )
    assert happened == ["term"] * 5, happened
