"""The throughput benchmark's functions on a tiny model: one timed step, fields present."""

import argparse

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
