"""Top-k labels with confidences for images, from pretrained weights.

    python predict.py --model tf_efficientnet_lite0 --weights lite0.pth coffee.jpg cat.png
    coffee.jpg
      1. espresso (95.1%)
      ...

An unreadable image is reported (by its path, on stderr) and the others are still
classified; the exit status is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import sys

from zoo.inference import load_classifier, load_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True, help="registry name, e.g. tf_efficientnet_lite0")
    parser.add_argument("--weights", required=True, help=".pth / .safetensors / .npz weights")
    parser.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    args = parser.parse_args(argv)

    classifier = load_classifier(args.weights, model=args.model)
    loaded, failed = [], 0
    for path in args.images:
        try:
            loaded.append((path, load_image(path)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    if loaded:
        predictions = classifier.predict([image for _, image in loaded], top_k=args.top_k)
        for (path, _), ranked in zip(loaded, predictions, strict=True):
            print(path)
            for rank, (label, probability) in enumerate(ranked, 1):
                print(f"  {rank}. {label} ({100 * probability:.1f}%)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
