"""Runs evaluators on a finished (or running) workdir without training, or on a baseline.

    python -m zoo.evaluate --workdir runs/simclr                        # its config's evals
    python -m zoo.evaluate --workdir runs/default --evals knn,linear_probe
    python -m zoo.evaluate --config configs/simclr_fashion_mnist_mini.py --baseline random
    python -m zoo.evaluate --config configs/simclr_fashion_mnist_mini.py --baseline pixels

A workdir's `config.json` names the model, method, dataset and evaluator settings; its latest
checkpoint gives the weights. `--baseline random` evaluates the config's backbone as
initialised (the run's seed, no training), `--baseline pixels` the normalised pixels
themselves as features: the floors a self-supervised method has to beat. Evaluators
(zoo/training/evaluate.py): classification, knn, linear_probe. Prints one line of metrics;
`--json` also writes them. Exit status 2 on a usage error (with the reason).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import runpy
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def load_config(workdir: str | None, config_file: str | None) -> Any:
    """The run config of `workdir` (its config.json over the current defaults, so a run of an
    older zoo gets the keys added since) or of a config file (`get_config()`)."""
    import ml_collections

    if config_file:
        if not pathlib.Path(config_file).is_file():
            raise FileNotFoundError(f"config file '{config_file}' not found")
        return runpy.run_path(config_file)["get_config"]()
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: give the --workdir of a zoo training run (train.py writes "
            "config.json there), or --config with --baseline"
        )
    saved = json.loads(path.read_text())
    try:
        from configs import common  # the repository's defaults, when run from its root
    except ImportError:
        return ml_collections.ConfigDict(saved)
    config = common.base()

    def merge(node: Any, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
                merge(node[key], value)
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    merge(config, saved)
    return config


def evaluate_workdir(
    config: Any, workdir: str | None, *, evals: str | None = None, baseline: str | None = None
) -> dict[str, Any]:
    """The metrics of `config.evals.names` (or `evals`) for the latest checkpoint of
    `workdir`, or for a `baseline` ("random": the initialised backbone, "pixels")."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from zoo.data.augment import make_augment
    from zoo.data.datasets import dataset_from_config
    from zoo.training import loop
    from zoo.training.checkpoint import latest_checkpoint, state_tree, train_state
    from zoo.training.evaluate import evaluator_names, run_evaluators
    from zoo.training.step import Parallel, make_mesh

    names = evaluator_names(evals if evals is not None else config.evals.names)
    if not names:
        raise ValueError("no evaluator to run: give --evals, e.g. --evals knn,linear_probe")
    if baseline and "classification" in names:
        raise ValueError(
            f"--baseline {baseline} has no classifier: use --evals knn and/or linear_probe"
        )
    spec = dataset_from_config(config.data)
    mesh = make_mesh()
    parts = loop.build(config, spec, mesh)
    state = parts.init(jax.random.split(jax.random.PRNGKey(config.seed))[0])  # as `run`
    method = parts.method
    if baseline == "pixels":
        method = dataclasses.replace(
            method, features=lambda p, s, e, images: images.reshape(images.shape[0], -1)
        )
    elif baseline is None:
        checkpoint = latest_checkpoint(workdir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"{workdir} has no checkpoint (checkpoints/<step>/state): train it first, or "
                "evaluate a --baseline"
            )
        abstract = state_tree(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        state = train_state(ocp.StandardCheckpointer().restore(checkpoint.absolute(), abstract))
    elif baseline != "random":
        raise ValueError(f"--baseline must be 'random' or 'pixels', got '{baseline}'")
    if names == ["classification"] and not method.is_classifier:
        raise ValueError(f"method '{method.name}' has no classifier: use --evals knn")
    eval_augment = make_augment(spec.mean, spec.std)
    parallel = Parallel(mesh)  # evaluation is the same under jit whatever the run's mode
    steps = {
        "eval_step": parallel.compile_eval_step(method=method, augment=eval_augment)
        if method.is_classifier
        else None,
        "features_step": parallel.compile_eval_step(
            method=method, augment=eval_augment, output="features"
        ),
    }
    results = run_evaluators(names, state, spec=spec, config=config, parallel=parallel, **steps)
    results["step"] = int(jax.device_get(state.step)) if baseline is None else 0
    results.pop("confusion", None)
    return {k: (v.item() if isinstance(v, jnp.ndarray) else v) for k, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zoo.evaluate", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a zoo training workdir")
    source.add_argument("--config", help="a config file (with --baseline)")
    parser.add_argument("--evals", help="comma-separated: classification, knn, linear_probe")
    parser.add_argument("--baseline", choices=("random", "pixels"))
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    if args.config and not args.baseline:
        parser.error("--config evaluates a baseline: add --baseline random or pixels")
    try:
        config = load_config(args.workdir, args.config)
        start = time.perf_counter()
        results = evaluate_workdir(config, args.workdir, evals=args.evals, baseline=args.baseline)
    except (ValueError, FileNotFoundError) as e:
        print(f"zoo.evaluate: {e}", file=sys.stderr)
        return 2
    what = args.baseline and f"{args.baseline} baseline" or f"step {results['step']}"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k not in ("count", "step"))
    print(
        f"{config.model.name} on {config.data.name} ({what}, {results['count']} eval images, "
        f"{time.perf_counter() - start:.1f} s): {metrics}"
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
