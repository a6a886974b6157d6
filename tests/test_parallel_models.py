"""The models give the same numbers on the whole batch (`jit`, axis_name=None) and split over
devices (`jax.pmap`, axis_name="data"): BatchNorm statistics over the global batch, and
dropout / stochastic-depth masks keyed by each example's global index (zoo/parallel.py).

  * every Dropout, DropPath and BatchNorm of every family (and of the SSL heads) is built
    with the model's `axis_name` (traced only, nothing compiled);
  * per family, a small variant with dropout and drop path on, in train mode, batch 16 whole
    and as 8 x 2 under pmap: outputs, updated BatchNorm statistics, the loss and its
    gradient (pmean'd under pmap) agree to float32 round-off. Measured, relative to each
    array's largest value (at least 1): at most 4.4e-6 (EfficientNet's gradients; its last
    BatchNorms see 16 values per channel, at 1x1), 4.3e-7 elsewhere; asserted 1e-5. Built
    without the axis_name, the pmap run is off by 0.1-0.6;
  * the masks differ between examples, and are the same for 8 and 1 devices and for a
    batch sharded over a mesh under jit.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import zoo
from zoo.methods.base import MLP, SSLNetwork
from zoo.methods.dino import DINOHead
from zoo.models import layers

DEVICES = 8
BATCH = 16
SIZE = 32
# LLVM at -O0 for the test programs: on 2 cores ViT's train step compiled in 1.8 s instead
# of 8.4 s and ran as fast at these sizes. XLA's own passes (fusion, layout) are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# name, overrides: small variants with every kind of randomness the family has. ConvNeXt
# (DropPath and the head's Dropout, LayerNorms: nothing the others lack) took as long to
# compile as EfficientNet; `test_every_dropout_drop_path_and_batch_norm_gets_the_axis_name`
# checks that it passes its axis_name on.
FAMILIES = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(
            img_size=SIZE,
            patch_size=8,
            depth=1,
            dropout_rate=0.1,
            attn_dropout_rate=0.1,
            drop_path_rate=0.5,
        ),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(
            img_size=SIZE,
            window_size=4,  # 8x8 tokens: shifted 4x4 windows, then one unshifted window
            embed_dim=32,
            depths=(2,),
            num_heads=(2,),
            dropout_rate=0.1,
            attn_dropout_rate=0.1,
            drop_path_rate=0.5,
        ),
    ),
    "resnet": ("resnet8", dict(drop_path_rate=0.5)),
    "efficientnet": (
        "efficientnet_b0",
        # the fewest blocks (one per stage), no squeeze-excite: quicker to compile
        dict(
            width_multiplier=0.5,
            depth_multiplier=0.1,
            se_ratio=0.0,
            drop_rate=0.2,
            drop_path_rate=0.5,
        ),
    ),
}


def random_variables(model, images: jax.Array, seed: int = 0) -> dict:
    """Variables of `model` drawn with numpy (shapes from `jax.eval_shape`): compiling flax's
    initialisers took longer than the test. Kernels and embeddings N(0, 1 / fan_in), norms'
    scales and LayerScale's gamma 1 (so that every residual branch, and its drop path, shows
    in the output), the rest 0."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    generator = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var", "gamma"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean") or leaf.ndim < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(generator.normal(0, fan_in**-0.5, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def compiled(fn, *args):
    """`fn` (jitted or pmapped) compiled for `args` with FAST_COMPILE."""
    return fn.lower(*args).compile(compiler_options=FAST_COMPILE)


def close(actual, expected, tol: float = 1e-5):
    """Equal to `tol` relative to the array's largest magnitude (at least 1)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


def loss_and_grads(model, params, stats, images, labels, rng):
    def loss_fn(params):
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        logits, new = model.apply(
            variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, new.get("batch_stats", {}))

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, stats, grads


def split_loss_and_grads(model, *args):
    loss, logits, stats, grads = loss_and_grads(model, *args)
    # equal shards: the mean of the per-device means is the global mean
    return jax.lax.pmean(loss, "data"), logits, stats, jax.lax.pmean(grads, "data")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jit_and_pmap_give_the_same_outputs_statistics_and_gradients(family):
    assert jax.device_count() >= DEVICES  # tests/conftest.py: 8 host CPU devices
    name, overrides = FAMILIES[family]
    model = zoo.create_model(name, num_classes=10, **overrides)
    split_model = zoo.create_model(name, num_classes=10, axis_name="data", **overrides)
    images = jax.random.normal(jax.random.PRNGKey(1), (BATCH, SIZE, SIZE, 3))
    labels = jax.random.randint(jax.random.PRNGKey(2), (BATCH,), 0, 10)
    variables = random_variables(model, images[:2])
    params, stats = variables["params"], variables.get("batch_stats", {})
    rng = jax.random.PRNGKey(3)

    args = (params, stats, images, labels, rng)
    step = compiled(jax.jit(functools.partial(loss_and_grads, model)), *args)
    loss, logits, new_stats, grads = step(*args)
    split = jax.pmap(
        functools.partial(split_loss_and_grads, split_model),
        axis_name="data",
        in_axes=(None, None, 0, 0, None),
    )
    shards = lambda x: x.reshape(DEVICES, BATCH // DEVICES, *x.shape[1:])  # noqa: E731
    split_args = (params, stats, shards(images), shards(labels), rng)
    split = compiled(split, *split_args)
    split_loss, split_logits, split_stats, split_grads = split(*split_args)

    close(split_logits.reshape(logits.shape), logits)
    close(split_loss[0], loss)
    assert bool(jax.tree.leaves(new_stats)) == (family in ("resnet", "efficientnet"))
    for a, b in zip(jax.tree.leaves(split_stats), jax.tree.leaves(new_stats), strict=True):
        np.testing.assert_array_equal(a, np.broadcast_to(a[0], a.shape))  # synchronised
        close(a[0], b)
    for a, b in zip(jax.tree.leaves(split_grads), jax.tree.leaves(grads), strict=True):
        close(a[0], b)

    # The randomness is on: another dropout key gives other logits.
    other = step(params, stats, images, labels, jax.random.PRNGKey(4))[1]
    assert float(jnp.abs(other - logits).max()) > 0.1


def axis_names(model: nn.Module, x: jax.Array) -> list[tuple[str, str | None]]:
    """(class name, axis_name) of every Dropout, DropPath and BatchNorm that `model` calls
    in train mode (traced, not compiled)."""
    seen = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        kinds = (layers.Dropout, layers.DropPath, nn.BatchNorm)
        if context.method_name == "__call__" and isinstance(module, kinds):
            seen.append((type(module).__name__, module.axis_name))
        return next_fun(*args, **kwargs)

    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    init = jax.vmap(lambda x: model.init(rngs, x, train=True), axis_name="data")  # binds "data"
    with nn.intercept_methods(record):
        jax.eval_shape(init, x[None])
    return seen


@pytest.mark.parametrize(
    "name",
    [
        "vit_base_patch16_224",
        "deit_base_distilled_patch16_224",
        "swin_tiny_patch4_window7_224",
        "convnext_tiny",
        "resnet50",
        "resnet20",
        "efficientnet_b0",
        "tf_efficientnet_lite0",
    ],
)
def test_every_dropout_drop_path_and_batch_norm_gets_the_axis_name(name):
    rates = dict(drop_path_rate=0.1)
    if name.startswith(("vit", "deit", "swin")):
        rates.update(dropout_rate=0.1, attn_dropout_rate=0.1)
    elif not name.startswith("resnet"):
        rates.update(drop_rate=0.1)
    model = zoo.create_model(name, num_classes=10, axis_name="data", **rates)
    size = 224 if name.startswith(("vit", "deit")) else 32
    seen = axis_names(model, jnp.zeros((2, size, size, 3)))
    kinds = {kind for kind, _ in seen}
    assert "DropPath" in kinds and (name.startswith("resnet") or "Dropout" in kinds)
    assert name.startswith(("vit", "deit", "swin", "convnext")) or "BatchNorm" in kinds
    assert {axis for _, axis in seen} == {"data"}, seen


def test_ssl_network_gives_its_axis_name_to_the_backbone_and_heads():
    backbone = zoo.create_model("resnet8", num_classes=0, drop_path_rate=0.1)
    heads = (
        ("projector", MLP((16, 8), last_batch_norm=True)),
        ("head", DINOHead(out_dim=8, hidden_dim=16, bottleneck_dim=8, batch_norm=True)),
    )
    x = jnp.zeros((2, SIZE, SIZE, 3))
    seen = axis_names(SSLNetwork(backbone, heads, axis_name="data"), x)
    assert len(seen) > 12 and {axis for _, axis in seen} == {"data"}
    assert {axis for _, axis in axis_names(SSLNetwork(backbone, heads), x)} == {None}


def masks(rate: float, axis_name: str | None):
    """The Dropout and DropPath masks (1 kept, 0 dropped) of a batch of ones."""

    def apply(x, rng):
        drop = layers.Dropout(rate, axis_name).apply({}, x, train=True, rngs={"dropout": rng})
        path = layers.DropPath(rate, axis_name).apply({}, x, train=True, rngs={"dropout": rng})
        return drop * (1 - rate), path * (1 - rate)

    return apply


def test_dropout_and_drop_path_masks_are_per_example_and_split_invariant():
    x, rng = jnp.ones((BATCH, 3, 5)), jax.random.PRNGKey(0)
    drop, path = compiled(jax.jit(masks(0.5, None)), x, rng)(x, rng)
    # DropPath drops some examples whole and keeps others; Dropout's masks differ by example
    kept = path.reshape(BATCH, -1)
    assert set(np.unique(kept)) == {0.0, 1.0} and bool(jnp.all(kept == kept[:, :1]))
    assert 0 < int(kept[:, 0].sum()) < BATCH
    rows = drop.reshape(BATCH, -1)
    assert len({tuple(np.asarray(row)) for row in rows}) == BATCH
    assert 0.3 < float(rows.mean()) < 0.7

    for devices in (DEVICES, 1):  # the same masks however the batch is split
        split = jax.pmap(
            masks(0.5, "data"), "data", in_axes=(0, None), devices=jax.devices()[:devices]
        )
        shards = x.reshape(devices, -1, *x.shape[1:])
        split_drop, split_path = compiled(split, shards, rng)(shards, rng)
        np.testing.assert_array_equal(split_drop.reshape(x.shape), drop)
        np.testing.assert_array_equal(split_path.reshape(x.shape), path)
    # and under jit with the batch sharded over a mesh
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    sharded_masks = compiled(jax.jit(masks(0.5, None)), sharded, rng)(sharded, rng)
    for a, b in zip(sharded_masks, (drop, path), strict=True):
        np.testing.assert_array_equal(a, b)
