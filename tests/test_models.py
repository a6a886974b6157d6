"""Every registered model: initialises, runs, and has exactly timm's parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo

# Trainable parameters at num_classes=1000, as timm counts them (shared/FACTS.md), or as zoo
# does for its own variants.
# A registered model without a pinned count fails `test_every_model_has_a_pinned_count`.
PARAM_COUNTS = {
    # ResNet family (timm)
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
    # CIFAR ResNets (He et al. 2016), option-A shortcuts: 0.27M for ResNet-20 at 10 classes
    # as in the paper's table 6; pinned here at 1000 classes like the rest.
    "resnet8": 139_640,
    "resnet20": 334_072,
    "resnet32": 528_504,
    "resnet44": 722_936,
    "resnet56": 917_368,
    # ConvNeXt (timm)
    "convnext_atto": 3_695_520,
    "convnext_nano": 15_593_560,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
    # EfficientNet / -Lite (timm); the tf_* ports have the same counts
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
    "efficientnet_lite0": 4_652_008,
    "efficientnet_lite1": 5_416_680,
    "efficientnet_lite2": 6_092_072,
    "efficientnet_lite3": 8_197_096,
    "efficientnet_lite4": 13_006_568,
    "tf_efficientnet_b0": 5_288_548,
    "tf_efficientnet_b1": 7_794_184,
    "tf_efficientnet_b2": 9_109_994,
    "tf_efficientnet_b3": 12_233_232,
    "tf_efficientnet_b4": 19_341_616,
    "tf_efficientnet_b5": 30_389_784,
    "tf_efficientnet_b6": 43_040_704,
    "tf_efficientnet_b7": 66_347_960,
    "tf_efficientnet_lite0": 4_652_008,
    "tf_efficientnet_lite1": 5_416_680,
    "tf_efficientnet_lite2": 6_092_072,
    "tf_efficientnet_lite3": 8_197_096,
    "tf_efficientnet_lite4": 13_006_568,
    # ViT / DeiT (timm)
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_base_distilled_patch16_224": 87_338_192,
    # Swin (timm)
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    "swin_base_patch4_window12_384": 87_903_584,
    # zoo's own 32 px variants (no timm counterpart): counted by zoo at 1000 classes like the
    # rest (at 10 classes: 1,205,898 / 1,268,356 / 3,376,290 / 4,020,358).
    "vit_nano_patch4_32": 1_333_608,
    "swin_nano_patch2_window4_32": 1_459_426,
    "convnext_atto_stem2_32": 3_694_080,
    "efficientnet_b0_stem1_32": 5_288_548,
}

# Input side for the run test: 32 unless a model needs another (e.g. a window size to divide).
SMALL_INPUT = 32
TEST_INPUT_SIZE: dict[str, int] = {}
# Models too slow to run eagerly in CI (> ~5 s each); `pytest -m slow` runs them.
SLOW_TO_RUN = {"resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d"}
SLOW_TO_RUN |= {
    "vit_base_patch16_224",
    "vit_base_patch32_224",
    "vit_large_patch16_224",
    "deit_base_patch16_224",
    "deit_base_distilled_patch16_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "swin_base_patch4_window12_384",
    # Same code as the tiny variants at another width; test_swin.py runs a 2-stage Swin-T
    # (jit) in train and eval mode, test_pretrained.py Swin-T at 224 against timm.
    "vit_small_patch16_224",
    "deit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
}
# zoo's 32 px ViT and Swin: 6 and 20 s eagerly; tests/test_compare.py trains the ViT end to end,
# tests/test_swin.py checks the Swin's windows (and a 2-stage Swin jitted).
SLOW_TO_RUN |= {"vit_nano_patch4_32", "swin_nano_patch2_window4_32"}
# ConvNeXt and EfficientNet: eagerly even the smallest take 30-60 s here (many small ops);
# tests/test_convnext.py and tests/test_efficientnet.py run them jitted (eval, train, features).
SLOW_TO_RUN |= {n for n in PARAM_COUNTS if n.startswith("convnext_") or "efficientnet_" in n}


def num_params(model, size=SMALL_INPUT):
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def input_size(name):
    return TEST_INPUT_SIZE.get(name, SMALL_INPUT)


def test_every_model_has_a_pinned_count():
    missing = [n for n in zoo.list_models() if n not in PARAM_COUNTS]
    assert not missing, f"pin the parameter count of {missing} in PARAM_COUNTS"


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count_equals_timm(name):
    model = zoo.create_model(name, num_classes=1000)
    assert num_params(model, input_size(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_RUN else n for n in zoo.list_models()],
)
def test_model_runs_train_and_eval(name):
    size = input_size(name)
    model = zoo.create_model(name, num_classes=7)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    out, updates = model.apply(
        variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"]
    )
    assert out.shape == (2, 7) and bool(jnp.all(jnp.isfinite(out)))


def test_resnet_block_outputs_are_buffers_with_the_same_values():
    from zoo import cpu

    model = zoo.create_model("resnet8", num_classes=5)  # 3 residual blocks
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)

    def loss(params):
        out, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out * jnp.arange(5))

    def run(policy):
        forward = jax.jit(cpu.traced(lambda v: model.apply(v, x, train=False), policy))
        conditionals = forward.lower(variables).compile().as_text().count(" conditional(")
        grads = jax.jit(cpu.traced(jax.grad(loss), policy))(variables["params"])
        return conditionals, forward(variables), grads

    conditionals, logits, grads = run(cpu.CpuPolicy())
    assert conditionals == 3  # one per block, kept by XLA:CPU's optimisations
    plain_conditionals, plain_logits, plain_grads = run(cpu.CpuPolicy(block_output_buffer=False))
    assert plain_conditionals == 0
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_num_classes_zero_returns_pooled_features(name):
    model = zoo.create_model(name, num_classes=0)
    x = jnp.zeros((2, SMALL_INPUT, SMALL_INPUT, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    features = model.apply(variables, x, train=False)
    assert features.shape == (2, 512 if name == "resnet18" else 64)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnt50'; did you mean: resnet50"):
        zoo.create_model("resnt50")


def test_unknown_override_names_the_model():
    with pytest.raises(ValueError, match="resnet18"):
        zoo.create_model("resnet18", num_clases=3)


def test_list_models_glob():
    assert zoo.list_models("resnet5*") == ["resnet50", "resnet56"]


def test_bfloat16_compute_keeps_float32_logits_and_params():
    model = zoo.create_model("resnet20", dtype=jnp.bfloat16)
    x = jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert model.apply(variables, x, train=False).dtype == jnp.float32
