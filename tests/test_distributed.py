"""Several processes as one run (zoo/training/distributed.py): two processes of 4 CPU devices
train, evaluate and checkpoint as one process of 8 devices does, write one checkpoint, resume
it, and stop together when one of them gets SIGTERM; bad settings fail before anything is
compiled, and each process reads its rows of the same global batches."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_data import data_config  # tests/ is on sys.path

from zoo.data import pipeline
from zoo.data.datasets import get_dataset
from zoo.training import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
# resnet8 on the embedded data, evaluated every 5 steps. A constant learning rate: a run of 5
# steps resumed to more is one run of more. A small one: float rounding, which differs between
# one process and two (the order of the sums), grows slowly from step to step.
RUN = [
    "--config=configs/default.py",
    "--config.model.name=resnet8",
    "--config.data.batch_size=16",
    "--config.data.eval_batch_size=2000",
    "--config.schedule.name=constant",
    "--config.optim.lr=0.01",
    "--config.logging.every_steps=1",
    "--config.evals.every_steps=5",
]
TIMEOUT = 300  # seconds, per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, args, *, devices, env=None):
    """Starts train.py; its output goes to files (a pipe nobody reads while it runs fills)."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))},
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **(env or {}),
    }
    command = [sys.executable, "train.py", f"--workdir={workdir}", *RUN, *args]
    name = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}-{time.monotonic_ns()}"
    outputs = [pathlib.Path(f"{name}.{kind}") for kind in ("out", "err")]
    with open(outputs[0], "w") as stdout, open(outputs[1], "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=stdout, stderr=stderr)
    process.outputs = outputs
    return process


def finish(processes) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process; all are killed when one times out."""
    try:
        for process in processes:
            process.wait(timeout=TIMEOUT)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [(p.returncode, *(path.read_text() for path in p.outputs)) for p in processes]


def two_processes(workdir, args, *, env=None, slurm=False):
    """Starts processes 0 and 1 of a run: with the config's parallel keys, or (slurm) with
    the environment of a SLURM job step of 2 tasks on this machine, as `srun` sets it."""
    port = free_port()
    processes = []
    for index in range(2):
        if slurm:
            cluster = {
                "SLURM_JOB_ID": "1",
                "SLURM_STEP_NODELIST": "localhost",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": str(index),
                "SLURM_LOCALID": str(index),
                "JAX_COORDINATOR_PORT": str(port),
            }
            processes.append(start(workdir, args, devices=4, env={**cluster, **(env or {})}))
        else:
            parallel = [
                f"--config.parallel.coordinator=127.0.0.1:{port}",
                "--config.parallel.num_processes=2",
                f"--config.parallel.process_id={index}",
            ]
            processes.append(start(workdir, [*args, *parallel], devices=4, env=env))
    return processes


def wait_until(condition, processes):
    """Waits for `condition()` while all `processes` run (all are killed if one stops or
    time runs out first)."""
    deadline = time.time() + TIMEOUT
    while not condition():
        if time.time() > deadline or any(p.poll() is not None for p in processes):
            for process in processes:
                process.kill()
            errors = [error[-3000:] for _, _, error in finish(processes)]
            raise AssertionError(f"a process stopped, or time ran out; stderr: {errors}")
        time.sleep(0.05)


def state_at(workdir, step) -> dict[str, np.ndarray]:
    """The train state of a checkpoint, on this process's first device (the saved shardings
    name the devices of the processes that wrote it)."""
    path = (pathlib.Path(workdir) / f"checkpoints/{step}/state").absolute()
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree,
    )
    state = checkpointer.restore(path, target)
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state)
    }


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]), initial=0)) for k in a)


def records(workdir, split):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines
    return [r for r in map(json.loads, lines) if r["split"] == split]


# Steps of the one-process reference, each checkpointed: the SIGTERM below, sent once a step
# past 5 is logged, stops both processes a few steps later (11 on a loaded 2-core machine,
# 2026-12-08, with steps in flight and the preemption sync), compared with this step's.
REFERENCE = 20


def test_two_processes_train_resume_and_stop_as_one_process_of_8_devices(tmp_path):
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    # The two-process runs share compiled programs (the same on the same devices).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "compiled")}
    args = ["--config.total_steps=5", "--config.checkpoint.every_steps=4"]
    first = two_processes(two, args, env=cache)
    # Once they train, the reference starts (not to slow down their compilation), with a
    # checkpoint at every step to compare any.
    wait_until(lambda: records(two, "train"), first)
    every_step = ["--config.checkpoint.every_steps=1", f"--config.checkpoint.keep={REFERENCE}"]
    reference = start(one, [f"--config.total_steps={REFERENCE}", *every_step], devices=8)
    results = finish(first)
    for index, (status, _, error) in enumerate(results):
        assert status == 0, f"process {index}:\n{error}"
    # Process 0 alone prints (gloo, the CPU collectives, prints its connections in both).
    assert "final eval on 2000 images" in results[0][1], results[0][1]
    assert "zoo:" not in results[1][1] and "eval" not in results[1][1], results[1][1]
    # Each checkpoint is one directory written by both, with both processes' data positions;
    # process 0 alone writes the metrics.
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir()) == [4, 5]
    data = json.loads((two / "checkpoints/5/data/metadata").read_text())
    assert len(data["process_states"]) == 2
    assert [r["step"] for r in records(two, "train")] == [1, 2, 3, 4, 5]
    assert len(list((two / "tensorboard").iterdir())) == 1

    # Checkpoint 5 damaged: both processes find it unusable, process 0 moves it aside, and
    # they resume from 4, as a SLURM job step. SIGTERM to process 1 (a preemption) stops both
    # at the same step with one checkpoint, exit status 0.
    largest = max((two / "checkpoints/5/state").rglob("*"), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x5A
    largest.write_bytes(bytes(data))
    args = [
        "--config.total_steps=40",
        "--config.evals.names=",
        "--config.checkpoint.every_steps=40",
    ]
    second = two_processes(two, args, env=cache, slurm=True)
    wait_until(lambda: any(r["step"] > 5 for r in records(two, "train")), second)
    second[1].send_signal(signal.SIGTERM)
    results = finish(second)
    for index, (status, _, error) in enumerate(results):
        assert status == 0, f"process {index}:\n{error}"
    output, error = results[0][1:]
    assert "checkpoint 5 is unusable" in error and "previous usable checkpoint, step 4" in error
    assert "checkpoint 5" not in results[1][2], results[1][2]  # said once, by process 0
    assert "resumed at step 4" in output and "stopped by SIGTERM at step" in output, output
    stopped = int(output.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 5 < stopped <= REFERENCE, output
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir()) == [4, stopped]
    assert [p.name for p in (two / "damaged_checkpoints").iterdir()] == ["5"]

    # Both end where one process of 8 devices does (the same global batches, the same crops).
    ((status, _, error),) = finish([reference])
    assert status == 0, error
    for step in (4, stopped):
        difference = max_difference(state_at(two, step), state_at(one, step))
        print(f"step {step}: largest difference {difference:.2g}")
        assert difference <= 1e-5, (step, difference)
    losses = [{r["step"]: r["loss"] for r in records(w, "train")} for w in (two, one)]
    for step, loss in losses[0].items():  # the resumed run's batches too
        assert loss == pytest.approx(losses[1][step], abs=1e-5), step
    (evaluated,) = records(two, "eval")
    (expected,) = [r for r in records(one, "eval") if r["step"] == 5]
    assert evaluated["count"] == expected["count"] == 2000
    assert evaluated["accuracy"] == pytest.approx(expected["accuracy"], abs=1 / 2000)
    assert evaluated["loss"] == pytest.approx(expected["loss"], abs=1e-5)


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_read_their_rows_of_the_global_batches_of_one_process(process_count):
    # 250 batches of 48 pass the end of the 10,000 examples' first epoch: the global order
    # goes on into the reshuffled second one. The random crops are the same (seeded by the
    # example's global position), and the iterator positions resume as they do in one.
    spec, config = get_dataset("fashion_mnist_mini"), data_config(batch_size=48)
    one = pipeline.train_iterator(spec, config, seed=1)
    processes = [
        pipeline.train_iterator(spec, config, seed=1, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for _ in range(250):
        expected, parts = next(one), [next(it) for it in processes]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in parts]), expected[key])
    states = [it.get_state() for it in processes]
    expected = next(one)
    for p, state in enumerate(states):
        resumed = pipeline.train_iterator(
            spec, config, seed=1, process_index=p, process_count=process_count
        )
        resumed.set_state(state)
        rows = slice(p * 48 // process_count, (p + 1) * 48 // process_count)
        np.testing.assert_array_equal(next(resumed)["image"], expected["image"][rows])


@pytest.mark.parametrize("process_count, eval_batch_size", [(2, 600), (3, 1500), (4, 4000)])
def test_processes_evaluate_their_rows_of_the_same_global_batches(process_count, eval_batch_size):
    # 2,000 examples: the last global batch is partial (600, 1500) or all of them (4000:
    # processes 2 and 3 have nothing to read, and pad).
    spec, config = (
        get_dataset("fashion_mnist_mini"),
        data_config(batch_size=48, eval_batch_size=eval_batch_size),
    )
    (one,) = [list(pipeline.eval_batches(spec, config))]
    shares = [
        list(pipeline.eval_batches(spec, config, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert all(len(share) == len(one) for share in shares)
    for b, expected in enumerate(one):
        for key in ("image", "label", "mask"):
            got = np.concatenate([share[b][key] for share in shares])
            np.testing.assert_array_equal(got, expected[key])


def parallel(coordinator="", num_processes=0, process_id=-1):
    return ml_collections.ConfigDict(
        {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    )


SLURM_4 = distributed.Cluster("slurm", "SLURM job step", 4, 3)
BAD = [
    (parallel(num_processes=-1), None, r"num_processes=-1 must be >= 0"),
    (parallel("h:1234"), None, r"coordinator='h:1234' is set but parallel.num_processes=0"),
    (parallel(process_id=1), None, r"process_id=1 is set but parallel.num_processes=0"),
    (parallel(num_processes=2, process_id=0), None, r"num_processes=2 needs parallel.coord"),
    (parallel("10.0.0.1", 2, 0), None, r"'10.0.0.1' is not host:port"),
    (parallel("h:99999", 2, 0), None, r"'h:99999' is not host:port"),
    (parallel("h:1234", 2, 2), None, r"process_id=2 is out of range .* 0 to 1"),
    (parallel("h:1234", 2, -1), None, r"process_id=-1 is out of range"),
    (parallel("h:1234", 2, 0), SLURM_4, r"disagree with the SLURM job step \(4 processes, "),
]


@pytest.mark.parametrize("config, cluster, message", BAD)
def test_bad_parallel_settings_name_the_numbers_and_the_fix(config, cluster, message):
    with pytest.raises(ValueError, match=message):
        distributed.check_parallel_config(config, cluster)


def test_settings_that_agree_with_the_cluster_or_need_none_pass():
    distributed.check_parallel_config(parallel(), None)
    distributed.check_parallel_config(parallel(), SLURM_4)
    distributed.check_parallel_config(parallel("h:1234", 4, 3), SLURM_4)
    # A one-task job step (an interactive srun) does not bind a run launched by hand.
    one_task = distributed.Cluster("slurm", "SLURM job step", 1, 0)
    distributed.check_parallel_config(parallel("[::1]:1234", 2, 1), one_task)


def test_slurm_and_open_mpi_environments_are_detected_as_jax_detects_them(monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_"))]:
        monkeypatch.delenv(key)
    assert distributed.detect_cluster() is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "4"}
    for key, value in {**slurm, "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.detect_cluster() == ("slurm", "SLURM job step", 4, 2)
    monkeypatch.delenv("SLURM_PROCID")  # salloc's shell, not a job step: not a cluster run
    assert distributed.detect_cluster() is None
    mpi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4", "OMPI_COMM_WORLD_SIZE": "2"}
    for key, value in {**mpi, "OMPI_COMM_WORLD_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.detect_cluster() == ("ompi", "Open MPI launch", 2, 1)


def test_bad_settings_exit_2_before_anything_is_compiled(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"--workdir={tmp_path}",
            "--config.parallel.coordinator=localhost:1234",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2, result.stderr
    assert "coordinator='localhost:1234' is set but parallel.num_processes=0" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())
