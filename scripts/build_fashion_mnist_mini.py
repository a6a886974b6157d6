"""Rebuilds the embedded dataset `fashion_mnist_mini` from the official Fashion-MNIST files.

A stratified, seeded subset of the real Fashion-MNIST (Xiao et al. 2017, MIT license):
1,000 training and 200 test images per class, drawn from the official train and test splits.

    apt-get install dataset-fashion-mnist     # the official IDX files, on Debian
    python scripts/build_fashion_mnist_mini.py [--idx_dir /usr/share/datasets/fashion-mnist]

Writes zoo/data/embedded/fashion_mnist_mini.npz (uint8 images [N, 28, 28], int labels [N]).
"""

import argparse
import pathlib

import numpy as np

from zoo.data.sources import read_fashion_mnist_idx

OUT = pathlib.Path(__file__).resolve().parents[1] / "zoo/data/embedded/fashion_mnist_mini.npz"


def stratified_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `per_class` random examples of each class, in random order."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)
    ]
    return rng.permutation(np.concatenate(picks))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train_per_class", type=int, default=1000)
    parser.add_argument("--test_per_class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = read_fashion_mnist_idx(args.idx_dir, split)
        keep = stratified_subset(labels, per_class, rng)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
