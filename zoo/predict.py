"""Top-k labels with confidences for images, from zoo workdirs or pretrained weights.

    python -m zoo.predict --workdir runs/default shoe.jpg photos/ 'more/*.png'
    python -m zoo.predict --weights lite0.pth --model tf_efficientnet_lite0 coffee.jpg
    python -m zoo.predict photos/ --workdir runs/a --ensemble runs/b runs/c --tta flip
    python -m zoo.predict --workdir runs/default --json out.json --csv out.csv --annotate out/ x.jpg

Prints, after a header line starting with '#':

    chelsea.png
      1. tabby (61.2%)
      2. tiger cat (21.0%)

Binary and multi-label models add the labels predicted at the threshold (`method.threshold`
of the run, or --threshold). Inputs are files, globs and folders (searched recursively for
image files). An unreadable image is reported (by its path, on stderr) and the others are
still classified; the exit status is 1 if any image failed, 2 on a usage error. The command
line (`cli`) runs with zoo's glibc allocator settings (zoo/cpu/allocator.py); `main` alone does
not change them.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"]
    + [".ppm", ".pgm", ".pbm"]
)


class UsageError(Exception):
    """A problem with the command line or the models: exit status 2."""


def _is_file(path: str | pathlib.Path) -> bool:
    """A file, or a broken symbolic link (listed, so that it is reported, not skipped)."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image paths, errors): files as given, folders searched recursively for image files
    (sorted), globs expanded (sorted; `**` recurses)."""
    paths, errors = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                str(p)
                for p in pathlib.Path(item).rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and _is_file(p)
            )
            paths += found
            if not found:
                errors.append(
                    f"{item}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
        elif os.path.lexists(item):  # a file as given (a broken link too: it is reported)
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if _is_file(p))
            paths += found
            if not found:
                errors.append(f"{item}: no file matches")
        else:
            errors.append(f"{item}: no such file or folder")
    return paths, errors


def load_predictor(args: argparse.Namespace):
    """A Classifier, or an Ensemble when several workdirs/weights are given."""
    from zoo.inference import Ensemble, load_classifier

    sources = list(args.workdir or []) + list(args.weights or []) + list(args.ensemble or [])
    if not sources:
        raise UsageError("give --workdir W (a zoo training run) or --weights F --model NAME")
    classifiers = []
    for source in sources:
        is_weights = not os.path.isdir(source)
        if is_weights and os.path.exists(source) and args.model is None:
            raise UsageError(f"{source} is a weights file: also give --model NAME (its model)")
        try:
            classifiers.append(
                load_classifier(
                    source,
                    model=args.model,
                    threshold=args.threshold,
                    batch_size=args.batch_size,
                    weights="raw" if getattr(args, "no_ema", False) else None,
                )
            )
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
    if len(classifiers) == 1:
        return classifiers[0]
    try:
        return Ensemble(classifiers, threshold=args.threshold)
    except ValueError as e:
        raise UsageError(str(e)) from None


def header(predictor: Any, tta: str | None) -> str:
    parts = [predictor.description, f"{predictor.task}, {len(predictor.class_names)} classes"]
    if predictor.task != "multiclass":
        parts.append(f"threshold {predictor.threshold:g}")
    if tta == "flip":
        parts.append("flip TTA")
    return "# " + "; ".join(parts)


def batches(paths: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def annotate(image, ranked: list[tuple[str, float]], path: pathlib.Path, title: str) -> None:
    """Writes a PNG: the image on the left, horizontal probability bars with labels beside it."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    figure = Figure(figsize=(8, 3), dpi=100)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    left.imshow(image)
    left.set_axis_off()
    left.set_title(title, fontsize=9)
    labels = [label for label, _ in ranked][::-1]
    values = [100 * p for _, p in ranked][::-1]
    bars = right.barh(range(len(values)), values, color="tab:blue")
    right.set_yticks(range(len(values)), labels, fontsize=9)
    right.set_xlim(0, 100)
    right.set_xlabel("probability (%)")
    for bar, value in zip(bars, values, strict=True):
        right.text(value + 1, bar.get_y() + bar.get_height() / 2, f"{value:.1f}%", va="center")
    figure.tight_layout()
    figure.savefig(path, format="png")


def unique_png(folder: pathlib.Path, image_path: str, taken: set[str]) -> pathlib.Path:
    stem, number = pathlib.Path(image_path).stem, 1
    name = f"{stem}.png"
    while name in taken:
        number += 1
        name = f"{stem}_{number}.png"
    taken.add(name)
    return folder / name


def classify_one_by_one(predictor, loaded, tta, failures):
    """(the images that could be classified, their probability rows), each alone."""
    kept, rows = [], []
    for path, image in loaded:
        try:
            rows.append(predictor.probabilities([image], tta=tta))
            kept.append((path, image))
        except ValueError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failures.append(f"{path}: {e}")
    return kept, rows


def format_result(
    path: str, ranked: list[tuple[str, float]], predicted: list[str], predictor
) -> str:
    """The path, then '  1. label (61.2%)' lines; binary and multi-label models add the
    labels predicted at their threshold."""
    lines = [path] + [
        f"  {position}. {label} ({100 * probability:.1f}%)"
        for position, (label, probability) in enumerate(ranked, 1)
    ]
    if predictor.task == "binary":
        lines.append(f"  predicted at threshold {predictor.threshold:g}: {predicted[0]}")
    elif predictor.task == "multilabel":
        shown = ", ".join(predicted) if predicted else "none"
        lines.append(f"  labels at/above threshold {predictor.threshold:g}: {shown}")
    return "\n".join(lines)


def write_json(path: pathlib.Path, predictor, tta: str | None, results, failures) -> None:
    report = {
        "model": predictor.description,
        "task": predictor.task,
        "threshold": predictor.threshold,
        "tta": tta,
        "class_names": predictor.class_names,
        "images": [
            {
                "path": r["path"],
                "top_k": [{"label": label, "probability": p} for label, p in r["top_k"]],
                "predicted": r["predicted"],
            }
            for r in results
        ],
        "errors": failures,
    }
    path.write_text(json.dumps(report, indent=2))


def write_csv(path: pathlib.Path, results) -> None:
    """Rows path,rank,label,probability,predicted (1 when the label is a predicted one)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "rank", "label", "probability", "predicted"])
        for r in results:
            for position, (label, p) in enumerate(r["top_k"], 1):
                writer.writerow(
                    [r["path"], position, label, f"{p:.6f}", int(label in r["predicted"])]
                )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zoo.predict",
        description=__doc__.split("\n")[0],
        epilog="Exit status: 0 ok, 1 some image could not be read, 2 usage error.",
    )
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
    parser.add_argument(
        "--workdir", action="append", help="zoo training workdir (repeat for an ensemble)"
    )
    parser.add_argument(
        "--weights", action="append", help=".pth/.safetensors/.npz weights (needs --model)"
    )
    parser.add_argument("--model", help="registry name of --weights, e.g. tf_efficientnet_lite0")
    parser.add_argument(
        "--ensemble",
        nargs="+",
        metavar="W",
        help="more workdirs/weights: average the probabilities of all (same classes); "
        "put it after the images, or end its list with --",
    )
    parser.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    parser.add_argument(
        "--threshold", type=float, help="binary/multi-label decision threshold (default: the run's)"
    )
    parser.add_argument("--tta", choices=["flip"], help="average with the mirror image")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--csv", metavar="FILE", help="also write path,rank,label,probability rows")
    parser.add_argument("--annotate", metavar="DIR", help="write each image with its top-k as PNG")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument(
        "--no-ema",
        action="store_true",
        help="a workdir trained with optim.ema_decay: its last weights, not their moving "
        "average (the default)",
    )
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from zoo.inference import load_image, rank

    paths, errors = expand_inputs(args.images)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    failures = list(errors)
    try:
        predictor = load_predictor(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    annotate_dir = pathlib.Path(args.annotate) if args.annotate else None
    if annotate_dir is not None:
        annotate_dir.mkdir(parents=True, exist_ok=True)
    top_k = min(args.top_k, len(predictor.class_names))
    print(header(predictor, args.tta), flush=True)
    results, taken = [], set()
    for chunk in batches(paths, args.batch_size):
        loaded = []
        for path in chunk:
            try:
                loaded.append((path, load_image(path)))
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                failures.append(str(e))
        if not loaded:
            continue
        try:
            probabilities = predictor.probabilities([image for _, image in loaded], tta=args.tta)
        except ValueError:  # an image the preprocessing cannot take: find it, keep the others
            loaded, rows = classify_one_by_one(predictor, loaded, args.tta, failures)
            if not loaded:
                continue
            probabilities = np.concatenate(rows)
        ranked_all = rank(probabilities, predictor.class_names, top_k)
        decisions = predictor.decide(probabilities)
        for (path, image), ranked, predicted in zip(loaded, ranked_all, decisions, strict=True):
            print(format_result(path, ranked, predicted, predictor))
            results.append({"path": path, "top_k": ranked, "predicted": predicted})
            if annotate_dir is not None:
                title = f"{pathlib.Path(path).name}: {ranked[0][0]}"
                annotate(image, ranked, unique_png(annotate_dir, path, taken), title)
        sys.stdout.flush()
    if args.json:
        write_json(pathlib.Path(args.json), predictor, args.tta, results, failures)
    if args.csv:
        write_csv(pathlib.Path(args.csv), results)
    return 1 if failures else 0


def cli() -> int:
    """`python -m zoo.predict` and predict.py: `main` with glibc keeping freed memory for the
    next batch, set before JAX starts its threads (zoo/cpu/allocator.py)."""
    from zoo import cpu

    cpu.keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(cli())
