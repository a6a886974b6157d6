"""Convert timm/torchvision weights to flax variables once, for loading without torch.

    python -m zoo.convert --model vit_small_patch16_224 --weights model.safetensors --out w/
    python -m zoo.convert --model resnet50 --weights resnet50.pth --num-classes 10 --out w/

writes `w/variables.msgpack` (the variables, `flax.serialization.msgpack_serialize` of a
nested dict of numpy arrays) and `w/pretrained.json` (model name, num_classes and the
variant's pretrained metadata: input size, crop_pct, mean/std, interpolation, timm name,
license). Read them back with `read_converted("w/")`; needs neither torch nor timm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from flax import serialization

from zoo.models.registry import model_entry
from zoo.models.weights import load_pretrained

VARIABLES_FILE = "variables.msgpack"
METADATA_FILE = "pretrained.json"


def write_converted(out_dir: str, variables: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Writes variables (msgpack) and metadata (JSON) into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    arrays = jax.tree.map(np.asarray, variables)
    with open(os.path.join(out_dir, VARIABLES_FILE), "wb") as f:
        f.write(serialization.msgpack_serialize(arrays))
    with open(os.path.join(out_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)


def read_converted(out_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (variables, metadata) written by `python -m zoo.convert`."""
    with open(os.path.join(out_dir, VARIABLES_FILE), "rb") as f:
        variables = serialization.msgpack_restore(f.read())
    with open(os.path.join(out_dir, METADATA_FILE)) as f:
        return variables, json.load(f)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m zoo.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, help="registry name, e.g. resnet50")
    parser.add_argument("--weights", required=True, help=".safetensors, .pth/.pt/.bin or .npz")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-classes", type=int, default=None, help="re-initialise the head")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    variables = load_pretrained(args.model, args.weights, num_classes=args.num_classes)
    entry = model_entry(args.model)
    pretrained = dataclasses.asdict(entry.pretrained) if entry.pretrained else {}
    num_classes = (
        args.num_classes if args.num_classes is not None else pretrained.get("num_classes")
    )
    metadata = {
        "model": args.model,
        "num_classes": num_classes,
        "source": os.path.abspath(args.weights),
        "pretrained": pretrained,
    }
    write_converted(args.out, variables, metadata)
    count = sum(x.size for x in jax.tree.leaves(variables.get("params", {})))
    print(
        f"converted {args.model} ({count:,} parameters) in {time.perf_counter() - start:.1f}s "
        f"-> {os.path.join(args.out, VARIABLES_FILE)}"
    )
    return metadata


if __name__ == "__main__":
    main()
