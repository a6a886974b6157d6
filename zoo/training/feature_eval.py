"""Feature-based evaluators for self-supervised representations: weighted k-NN and a linear probe.

Both take frozen features (numpy ``float32 [N, D]``) and integer labels (``[N]``) that have
already been extracted from a backbone, and return plain Python / numpy results.

* **Weighted k-NN** (DINO, Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
  Transformers", ``eval_knn.py``): features are L2-normalised, each test example retrieves its
  ``k`` most cosine-similar training examples, each of which votes for its label with weight
  ``exp(similarity / temperature)``; the prediction is the class with the largest summed vote.
* **Linear probe** (the linear evaluation protocol of Zhang et al. 2016, "Colorful Image
  Colorization", as used by Chen et al. 2020, SimCLR): a linear classifier is trained on top of
  the frozen (here: standardised) features and its test accuracy is reported. This version is
  full-batch and deterministic (zero init), trained with Adam in a single compiled scan.

Usage::

    from zoo.training.feature_eval import knn_accuracy, knn_classify, linear_probe

    preds = knn_classify(train_x, train_y, test_x, num_classes=10, k=20, temperature=0.07)
    top1 = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10)
    votes = knn_votes(train_x, train_y, test_x, num_classes=10)  # [N_test, C]: e.g. top-5
    probe = linear_probe(train_x, train_y, test_x, test_y, num_classes=10, steps=500)
    probe["accuracy"], probe["train_accuracy"], probe["loss"]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


def _check(features: np.ndarray, labels: np.ndarray | None, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"{name} features must be [N, D], got shape {features.shape}")
    if labels is not None and np.shape(labels) != (features.shape[0],):
        raise ValueError(
            f"{name} labels must have shape ({features.shape[0]},), got {np.shape(labels)}"
        )
    return features


def _l2_normalize(x: jax.Array) -> jax.Array:
    # As torch.nn.functional.normalize: x / max(||x||, eps).
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_votes_chunk(
    train_normed: jax.Array,
    train_labels: jax.Array,
    test_chunk: jax.Array,
    temperature: jax.Array,
    *,
    k: int,
    num_classes: int,
) -> jax.Array:
    """Summed class votes ``[B, num_classes]`` for one (padded) chunk of test features."""
    sims = jnp.matmul(_l2_normalize(test_chunk), train_normed.T, precision=_HIGHEST)  # [B, N]
    top_sims, top_idx = jax.lax.top_k(sims, k)  # [B, k], most similar first
    # exp(s / T) up to a per-row factor exp(-max_s / T): same argmax/ranking, no overflow.
    weights = jnp.exp((top_sims - top_sims[:, :1]) / temperature)
    one_hot = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=weights.dtype)
    return jnp.sum(one_hot * weights[..., None], axis=1)


def knn_votes(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Per-class weighted k-NN votes for every test example (DINO's ``knn_classifier``).

    Each row is proportional to ``sum_{j in top-k} exp(cos(x, x_j) / T) * onehot(y_j)``; it is
    scaled per row by ``exp(-max_j cos(x, x_j) / T)`` to avoid overflow at small temperatures,
    which leaves the ranking of classes (hence top-1 / top-5) unchanged.

    Args:
        train_features: Training features, ``float32 [N_train, D]``.
        train_labels: Training labels, ``int [N_train]`` in ``[0, num_classes)``.
        test_features: Query features, ``float32 [N_test, D]``.
        num_classes: Number of classes.
        k: Number of neighbours; capped at ``N_train`` (then every training example votes).
        temperature: Softmax-like temperature ``T`` of the vote weights.
        chunk_size: Test examples per compiled call; the last chunk is zero-padded to this size
            (or to ``N_test`` if smaller) so the function compiles once. Bounds memory to
            ``O(chunk_size * N_train)``.

    Returns:
        ``float32 [N_test, num_classes]`` vote scores.
    """
    train_features = _check(train_features, train_labels, "train")
    test_features = _check(test_features, None, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature dims differ: train {train_features.shape[1]}, test {test_features.shape[1]}"
        )
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}")
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if n_train == 0:
        raise ValueError("train set is empty")
    if n_test == 0:
        return np.zeros((0, num_classes), np.float32)
    k = min(k, n_train)
    chunk = min(chunk_size, n_test)
    train_normed = _l2_normalize(jnp.asarray(train_features))
    labels = jnp.asarray(np.asarray(train_labels, dtype=np.int32))
    temp = jnp.float32(temperature)

    out = []
    for start in range(0, n_test, chunk):
        block = test_features[start : start + chunk]
        n = block.shape[0]
        if n < chunk:
            block = np.concatenate([block, np.zeros((chunk - n, block.shape[1]), np.float32)])
        votes = _knn_votes_chunk(train_normed, labels, block, temp, k=k, num_classes=num_classes)
        out.append(np.asarray(votes)[:n])
    return np.concatenate(out)


def knn_classify(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Weighted k-NN predictions on L2-normalised features (DINO, Caron et al. 2021).

    Args:
        train_features: Training features, ``float32 [N_train, D]``.
        train_labels: Training labels, ``int [N_train]`` in ``[0, num_classes)``.
        test_features: Query features, ``float32 [N_test, D]``.
        num_classes: Number of classes.
        k: Number of neighbours; capped at ``N_train``.
        temperature: Temperature ``T`` of the vote weights ``exp(similarity / T)``.
        chunk_size: Test examples per compiled call (see `knn_votes`).

    Returns:
        ``int [N_test]`` predicted classes (argmax of the summed votes; ties go to the lowest
        class index).
    """
    votes = knn_votes(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return np.argmax(votes, axis=-1)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of the weighted k-NN classifier (see `knn_classify`).

    Args:
        train_features: Training features, ``float32 [N_train, D]``.
        train_labels: Training labels, ``int [N_train]``.
        test_features: Test features, ``float32 [N_test, D]``.
        test_labels: Test labels, ``int [N_test]``.
        num_classes: Number of classes.
        k: Number of neighbours; capped at ``N_train``.
        temperature: Temperature of the vote weights.

    Returns:
        Fraction of test examples whose prediction equals the label.
    """
    _check(test_features, test_labels, "test")
    preds = knn_classify(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
    )
    return float(np.mean(preds == np.asarray(test_labels))) if len(preds) else 0.0


def _probe_objective(
    params: dict[str, jax.Array],
    x: jax.Array,
    y_one_hot: jax.Array,
    weight_decay: jax.Array,
) -> jax.Array:
    logits = jnp.matmul(x, params["w"], precision=_HIGHEST) + params["b"]
    ce = jnp.mean(optax.softmax_cross_entropy(logits, y_one_hot))
    return ce + 0.5 * weight_decay * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("steps", "num_classes"))
def _train_probe(
    x: jax.Array,
    y: jax.Array,
    learning_rate: jax.Array,
    weight_decay: jax.Array,
    *,
    steps: int,
    num_classes: int,
) -> tuple[dict[str, jax.Array], jax.Array]:
    y_one_hot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
    params = {
        "w": jnp.zeros((x.shape[1], num_classes), x.dtype),
        "b": jnp.zeros((num_classes,), x.dtype),
    }
    tx = optax.adam(learning_rate)
    grad_fn = jax.grad(_probe_objective)

    def step(carry, _):
        params, opt_state = carry
        grads = grad_fn(params, x, y_one_hot, weight_decay)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, _probe_objective(params, x, y_one_hot, weight_decay)


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    steps: int = 500,
    learning_rate: float = 0.01,
    weight_decay: float = 0.0,
) -> dict[str, float | np.ndarray]:
    """Linear evaluation protocol (Zhang et al. 2016; Chen et al. 2020) on frozen features.

    Features are standardised with the training set's per-dimension mean and std (``std +
    1e-6``); a linear layer (zero-initialised weights and bias) is trained with
    ``optax.adam(learning_rate)`` for ``steps`` full-batch steps on the mean softmax
    cross-entropy plus ``0.5 * weight_decay * ||W||^2`` (weights only), in one compiled
    `jax.lax.scan`. Deterministic.

    Args:
        train_features: Training features, ``float32 [N_train, D]``.
        train_labels: Training labels, ``int [N_train]`` in ``[0, num_classes)``.
        test_features: Test features, ``float32 [N_test, D]``.
        test_labels: Test labels, ``int [N_test]``.
        num_classes: Number of classes.
        steps: Number of full-batch Adam steps.
        learning_rate: Adam learning rate.
        weight_decay: L2 penalty coefficient on the weights (not the bias).

    Returns:
        A dict with ``"accuracy"`` (test top-1), ``"train_accuracy"``, ``"loss"`` (the training
        objective, cross-entropy plus weight penalty, at the final parameters), and the learned
        ``"weights"`` (``[D, num_classes]``) and ``"bias"`` (``[num_classes]``) as numpy arrays;
        they apply to standardised features, ``(x - "mean") / "std"`` (both ``[D]``, also
        returned).
    """
    train_features = _check(train_features, train_labels, "train")
    test_features = _check(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature dims differ: train {train_features.shape[1]}, test {test_features.shape[1]}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("train set is empty")
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0) + np.float32(1e-6)
    x_train = (train_features - mean) / std
    x_test = (test_features - mean) / std
    y_train = np.asarray(train_labels, dtype=np.int32)
    y_test = np.asarray(test_labels, dtype=np.int32)

    params, loss = _train_probe(
        jnp.asarray(x_train),
        jnp.asarray(y_train),
        jnp.float32(learning_rate),
        jnp.float32(weight_decay),
        steps=steps,
        num_classes=num_classes,
    )
    w, b = np.asarray(params["w"]), np.asarray(params["b"])

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(np.argmax(x @ w + b, axis=-1) == y)) if len(y) else 0.0

    return {
        "accuracy": accuracy(x_test, y_test),
        "train_accuracy": accuracy(x_train, y_train),
        "loss": float(loss),
        "weights": w,
        "bias": b,
        "mean": mean,
        "std": std,
    }
