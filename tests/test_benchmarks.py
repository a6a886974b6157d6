"""The throughput benchmark's functions on a tiny model: one timed step, fields present."""

import argparse
import time

from benchmarks import throughput

FIELDS = ("images_per_s", "images_per_s_min", "images_per_s_max", "step_ms", "gflops_per_image")


def test_benchmark_rows_have_positive_fields():
    case = throughput.Case("resnet8", 16, "sgd")
    args = argparse.Namespace(
        train_batch=8,
        infer_batch=8,
        device="cpu",
        precision="fp32",
        warmup=0,
        steps=1,
        pause=0.0,
        vs_timm=False,
        channels_last=False,
        matmul_size=256,
    )
    for mode in ("train", "infer"):
        row = throughput.bench_case(case, mode, args, peak=1e11)
        zoo = row["zoo"]
        for field in (*FIELDS, "compile_s", "achieved_gflops", "utilisation"):
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
    times = throughput.interleaved(runners, warmup=1, steps=3, pause=0.05)
    elapsed = time.perf_counter() - start
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then alternating
    assert elapsed >= 6 * 0.05  # one pause per timed step
    assert all(len(t) == 3 and max(t) < 0.04 for t in times.values())  # pauses not timed


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
