"""k-NN and linear-probe evaluators against plain numpy references written with explicit loops."""

import math

import numpy as np
import pytest

from zoo.training.feature_eval import knn_accuracy, knn_classify, knn_votes, linear_probe

# ---------------------------------------------------------------------------------------------
# k-NN


def knn_reference(train_x, train_y, test_x, num_classes, k, temperature):
    """DINO's weighted k-NN, one test example at a time, in float64."""
    train_x = np.asarray(train_x, np.float64)
    test_x = np.asarray(test_x, np.float64)
    k = min(k, len(train_x))
    train_n = [x / max(np.linalg.norm(x), 1e-12) for x in train_x]
    preds = []
    for q in test_x:
        q = q / max(np.linalg.norm(q), 1e-12)
        sims = [float(np.dot(q, t)) for t in train_n]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])  # stable: ties -> lower index
        votes = [0.0] * num_classes
        for j in order[:k]:
            votes[int(train_y[j])] += math.exp(sims[j] / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return np.array(preds)


def _random_set(seed, n_train=40, n_test=13, dim=5, num_classes=4):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n_train, dim)).astype(np.float32),
        rng.integers(0, num_classes, n_train),
        rng.normal(size=(n_test, dim)).astype(np.float32),
        rng.integers(0, num_classes, n_test),
    )


@pytest.mark.parametrize("chunk_size", [1024, 4])  # one padded chunk; several + a padded tail
def test_knn_matches_reference(chunk_size):
    tr_x, tr_y, te_x, te_y = _random_set(0)
    ref = knn_reference(tr_x, tr_y, te_x, 4, k=7, temperature=0.07)
    preds = knn_classify(tr_x, tr_y, te_x, num_classes=4, k=7, chunk_size=chunk_size)
    assert preds.shape == (13,)
    np.testing.assert_array_equal(preds, ref)
    acc = knn_accuracy(tr_x, tr_y, te_x, te_y, num_classes=4, k=7)
    assert acc == pytest.approx(np.mean(ref == te_y))


def test_knn_temperature_matters_and_matches_reference():
    # A large temperature makes votes nearly uniform (majority vote among the k neighbours).
    tr_x, tr_y, te_x, _ = _random_set(1, n_train=60, n_test=30, dim=3, num_classes=3)
    for temperature in (0.05, 1.0, 100.0):
        ref = knn_reference(tr_x, tr_y, te_x, 3, k=11, temperature=temperature)
        preds = knn_classify(tr_x, tr_y, te_x, num_classes=3, k=11, temperature=temperature)
        np.testing.assert_array_equal(preds, ref)


def test_knn_k_larger_than_train_set():
    tr_x, tr_y, te_x, _ = _random_set(2, n_train=6, n_test=9)
    ref = knn_reference(tr_x, tr_y, te_x, 4, k=6, temperature=0.07)
    preds = knn_classify(tr_x, tr_y, te_x, num_classes=4, k=50, chunk_size=5)
    np.testing.assert_array_equal(preds, ref)


def test_knn_votes_scale_and_top5():
    tr_x, tr_y, te_x, _ = _random_set(3, num_classes=6)
    votes = knn_votes(tr_x, tr_y, te_x, num_classes=6, k=7, temperature=0.1)
    assert votes.shape == (13, 6) and np.all(votes >= 0)
    # Each row is the DINO vote vector scaled so the nearest neighbour has weight 1.
    n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    sims = n(te_x.astype(np.float64)) @ n(tr_x.astype(np.float64)).T
    for i in range(len(te_x)):
        top = np.argsort(-sims[i], kind="stable")[:7]
        expected = np.zeros(6)
        for j in top:
            expected[tr_y[j]] += np.exp((sims[i, j] - sims[i, top[0]]) / 0.1)
        np.testing.assert_allclose(votes[i], expected, rtol=1e-4, atol=1e-6)
    top5 = np.argsort(-votes, axis=1)[:, :5]
    assert top5.shape == (13, 5)


def test_knn_clusters_vs_random_labels():
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(5, 16)) * 4.0
    tr_y, te_y = rng.integers(0, 5, 100), rng.integers(0, 5, 50)
    tr_x = (centers[tr_y] + rng.normal(size=(100, 16))).astype(np.float32)
    te_x = (centers[te_y] + rng.normal(size=(50, 16))).astype(np.float32)
    assert knn_accuracy(tr_x, tr_y, te_x, te_y, num_classes=5, k=10) == 1.0
    # Labels unrelated to the features: about chance (1/5).
    shuffled = rng.permutation(tr_y)
    acc = knn_accuracy(tr_x, shuffled, te_x, rng.integers(0, 5, 50), num_classes=5, k=10)
    assert acc < 0.5


def test_knn_small_temperature_no_overflow():
    tr_x, tr_y, te_x, _ = _random_set(5)
    votes = knn_votes(tr_x, tr_y, te_x, num_classes=4, k=7, temperature=1e-3)
    assert np.all(np.isfinite(votes))


# ---------------------------------------------------------------------------------------------
# Linear probe


def probe_reference(tr_x, tr_y, te_x, te_y, num_classes, steps, lr, wd):
    """Standardise, zero init, full-batch softmax CE + 0.5*wd*||W||^2, Adam (optax defaults)."""
    tr_x, te_x = np.asarray(tr_x, np.float64), np.asarray(te_x, np.float64)
    mean, std = tr_x.mean(0), tr_x.std(0) + 1e-6
    x, xt = (tr_x - mean) / std, (te_x - mean) / std
    n, d = x.shape
    onehot = np.eye(num_classes)[tr_y]
    w, b = np.zeros((d, num_classes)), np.zeros(num_classes)
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = {"w": np.zeros_like(w), "b": np.zeros_like(b)}
    v = {"w": np.zeros_like(w), "b": np.zeros_like(b)}

    def objective(w, b):
        logits = x @ w + b
        logits = logits - logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -(onehot * logp).sum(1).mean() + 0.5 * wd * (w**2).sum(), np.exp(logp)

    for t in range(1, steps + 1):
        _, probs = objective(w, b)
        dlogits = (probs - onehot) / n
        grads = {"w": x.T @ dlogits + wd * w, "b": dlogits.sum(0)}
        params = {"w": w, "b": b}
        for key in ("w", "b"):
            m[key] = b1 * m[key] + (1 - b1) * grads[key]
            v[key] = b2 * v[key] + (1 - b2) * grads[key] ** 2
            m_hat = m[key] / (1 - b1**t)
            v_hat = v[key] / (1 - b2**t)
            params[key] = params[key] - lr * m_hat / (np.sqrt(v_hat) + eps)
        w, b = params["w"], params["b"]
    loss, _ = objective(w, b)
    return {
        "accuracy": np.mean(np.argmax(xt @ w + b, 1) == te_y),
        "train_accuracy": np.mean(np.argmax(x @ w + b, 1) == tr_y),
        "loss": loss,
        "weights": w,
        "bias": b,
    }


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_linear_probe_matches_reference(weight_decay):
    rng = np.random.default_rng(10)
    tr_x = (rng.normal(size=(60, 6)) * [1, 3, 0.5, 2, 1, 10] + [0, 1, -2, 5, 0, 3]).astype(
        np.float32
    )
    tr_y = rng.integers(0, 3, 60)
    te_x = rng.normal(size=(20, 6)).astype(np.float32) * 2
    te_y = rng.integers(0, 3, 20)
    kw = dict(num_classes=3, steps=80, learning_rate=0.01, weight_decay=weight_decay)
    out = linear_probe(tr_x, tr_y, te_x, te_y, **kw)
    ref = probe_reference(tr_x, tr_y, te_x, te_y, 3, 80, 0.01, weight_decay)
    assert out["accuracy"] == pytest.approx(ref["accuracy"])
    assert out["train_accuracy"] == pytest.approx(ref["train_accuracy"])
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert out["weights"].shape == (6, 3) and out["bias"].shape == (3,)
    np.testing.assert_allclose(out["weights"], ref["weights"], atol=1e-4)
    np.testing.assert_allclose(out["bias"], ref["bias"], atol=1e-4)
    # The loss decreased from its zero-init value log(C).
    assert out["loss"] < math.log(3)


def test_linear_probe_separable_and_deterministic():
    rng = np.random.default_rng(11)
    w_true = rng.normal(size=(8, 4))
    tr_x = rng.normal(size=(80, 8)).astype(np.float32)
    te_x = rng.normal(size=(30, 8)).astype(np.float32)
    tr_y, te_y = np.argmax(tr_x @ w_true, 1), np.argmax(te_x @ w_true, 1)
    kw = dict(num_classes=4, steps=300, learning_rate=0.05)
    out = linear_probe(tr_x, tr_y, te_x, te_y, **kw)
    assert out["train_accuracy"] == 1.0
    assert out["accuracy"] >= 0.8
    again = linear_probe(tr_x, tr_y, te_x, te_y, **kw)
    np.testing.assert_array_equal(out["weights"], again["weights"])
    assert out["loss"] == again["loss"]
