"""The throughput benchmark's functions on a tiny model: one timed step, fields present."""

import argparse
import mmap
import time

import pytest

import zoo.models.conv
from benchmarks import throughput
from zoo import cpu
from zoo.cpu import conv as cpu_conv

FIELDS = ("images_per_s", "images_per_s_min", "images_per_s_max", "step_ms", "gflops_per_image")


def bench_args(**overrides) -> argparse.Namespace:
    """The options bench_case reads: resnet8 at batch 8, one timed step, no timm."""
    options = dict(train_batch=8, infer_batch=8, device="cpu", precision="fp32", warmup=0)
    options |= dict(max_warmup=0)
    options |= dict(steps=1, pause=0.0, vs_timm=False, channels_last=False, matmul_size=256)
    return argparse.Namespace(**(options | dict(compare=[]) | overrides))


def test_benchmark_rows_have_positive_fields():
    case = throughput.Case("resnet8", 16, "sgd")
    args = bench_args()
    for mode in ("train", "infer"):
        row = throughput.bench_case(case, mode, args, peak=1e11)
        zoo = row["zoo"]
        for field in (*FIELDS, "compile_s", "achieved_gflops", "utilisation", "cores_busy"):
            assert zoo[field] > 0, (mode, field, zoo)
        assert row["peak_gflops"] > 0
    meta = {
        "device": "cpu",
        "device_kind": "cpu",
        "precision": "fp32",
        "peak_source": "test",
        "steps": 1,
        "load_average": (0.0,),
        "load_average_end": (0.0,),
    }
    assert "resnet8@16" in throughput.markdown([row], meta)


def test_interleaved_pauses_before_each_step_outside_the_timing():
    order = []
    runners = {name: throughput.Runner(lambda name=name: order.append(name), 0.0) for name in "ab"}
    start = time.perf_counter()
    cpu = {}
    times = throughput.interleaved(runners, warmup=1, steps=3, pause=0.05, cpu=cpu)
    elapsed = time.perf_counter() - start
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then alternating
    assert elapsed >= 6 * 0.05  # one pause per timed step
    assert all(len(t) == 3 and max(t) < 0.04 for t in times.values())  # pauses not timed
    assert all(len(c) == 3 and max(c) < 0.04 for c in cpu.values())  # sleeping is not CPU


def test_page_faults_count_fresh_memory():
    before = throughput.page_faults()
    with mmap.mmap(-1, 16 << 20) as fresh:  # 4096 pages of 4 KiB, never touched
        fresh.write(b"x" * (16 << 20))
    assert throughput.page_faults() - before >= 4000


def test_warm_up_goes_on_until_steps_stop_faulting(monkeypatch):
    faults_per_step = iter([500_000, 0, 400_000, 0, 10, 0] + [0] * 20)
    total = [0]

    def step():
        total[0] += next(faults_per_step)

    monkeypatch.setattr(throughput, "page_faults", lambda: total[0])
    runner = throughput.Runner(step, 0.0)
    assert throughput.warm_up(runner, least=1, most=12) == 6  # three quiet steps after the 3rd
    assert throughput.warm_up(runner, least=5, most=12) == 5  # quiet from the start
    faults_per_step = iter([300_000] * 20)
    assert throughput.warm_up(runner, least=1, most=4) == 4  # never settles: stops at most
    assert throughput.warm_up(runner, least=2, most=0) == 2  # most=0: `least` steps, as before
    faults = {}
    throughput.interleaved({"a": runner}, 0, 2, 0.0, faults=faults)
    assert faults == {"a": [300_000, 300_000]}
    row = throughput.summarize([1.0, 1.0], 1, 1.0, 1.0, faults=faults["a"])
    assert row["page_faults_max"] == 300_000


def test_busy_step_counts_its_cpu_time_and_paired_ratio_is_per_round():
    def spin(seconds=0.05):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    cpu = {}
    times = throughput.interleaved({"spin": throughput.Runner(spin, 0.0)}, 0, 2, 0.0, cpu)
    row = throughput.summarize(times["spin"], 1, 1.0, 1.0, cpu["spin"])
    assert 0.8 < row["cores_busy"] <= 1.05  # one thread busy throughout
    # b took 2x as long as a in each round although the rounds' speeds differ 3x
    assert throughput.paired_ratio([1.0, 3.0, 2.0], [2.0, 6.0, 4.0]) == 2.0
    assert throughput.paired_ratio([1.0, 3.0, 2.0], [1.0, 2.0, 3.0]) == 1.0


def test_row_subprocess_gets_this_runs_options_and_its_own_row():
    argv = ["--vs-timm", "--models", "resnet50", "vit_small_patch16_224", "--steps", "5"]
    argv += ["--out=all.json", "--modes", "train", "infer", "--pause", "0.5"]
    child = throughput.row_argv(argv, "resnet50", "infer", "row.json")
    assert child == [
        "--vs-timm",
        "--steps",
        "5",
        "--pause",
        "0.5",
        "--models",
        "resnet50",
        "--modes",
        "infer",
        "--out",
        "row.json",
    ]


def test_compare_fields_parse_flip_and_reject_with_the_list():
    default = cpu.default()
    assert throughput.parse_policy_fields(["attention_vjp", "winograd=false"]) == {
        "attention_vjp": not default.attention_vjp,
        "winograd": False,
    }
    assert throughput.parse_policy_fields(["depthwise_vjp=off"]) == {"depthwise_vjp": False}
    with pytest.raises(ValueError, match="Did you mean attention_vjp") as error:
        throughput.parse_policy_fields(["atention_vjp"])
    assert "pointwise_gradient_buffer" in str(error.value)  # the whole list
    assert "block_output_buffer" in str(error.value)
    with pytest.raises(ValueError, match="use true or false"):
        throughput.parse_policy_fields(["attention_vjp=maybe"])
    with pytest.raises(ValueError, match="attention_slices=16"):
        throughput.parse_policy_fields(["attention_slices"])
    assert throughput.parse_policy_fields(["attention_slices=1"]) == {"attention_slices": 1}
    with pytest.raises(ValueError, match="whole number"):
        throughput.parse_policy_fields(["attention_slices=many"])


def test_compare_builds_a_second_zoo_runner_under_the_changed_policy(monkeypatch):
    seen = []
    build = throughput.zoo_runner

    def recording_runner(*args, **kwargs):
        seen.append(kwargs.get("policy_fields"))
        return build(*args, **kwargs)

    traced = []
    monkeypatch.setattr(throughput, "zoo_runner", recording_runner)
    original_conv2d = cpu_conv.conv2d

    def recording_conv2d(*args, **kwargs):
        traced.append(cpu.current().winograd)
        return original_conv2d(*args, **kwargs)

    monkeypatch.setattr(zoo.models.conv, "conv2d", recording_conv2d)
    args = bench_args(compare=["winograd=false"])
    row = throughput.bench_case(throughput.Case("resnet8", 16, "sgd"), "infer", args, 1e11)
    assert seen == [None, {"winograd": False}]
    assert set(traced) == {True, False}  # each program traced under its own policy
    assert row["zoo_switched"]["switches"] == {"winograd": False}
    assert row["zoo_switched"]["images_per_s"] > 0 and row["zoo_over_switched"] > 0
    assert row["zoo_over_switched_paired"] > 0
    meta = {"device": "cpu", "device_kind": "cpu", "precision": "fp32", "peak_source": "test"}
    meta |= {"steps": 1, "load_average": (0.0,), "load_average_end": (0.0,)}
    assert "| winograd=False |" in throughput.markdown([row], meta)
