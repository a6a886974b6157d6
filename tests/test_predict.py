"""Classifying real photos with real zoo checkpoints: `zoo.load_classifier(workdir)` and
`python -m zoo.predict` (formats, JSON/CSV/annotated PNG, flip TTA, ensembles, bad files,
binary sigmoid outputs, error messages).

One ResNet-8 run of 40 steps on the embedded Fashion-MNIST subset gives two checkpoints
(steps 20 and 40: two workdirs for an ensemble); a 4-step run on the binary footwear task
gives a one-logit model. The photos are scikit-image's (astronaut, chelsea, coffee).
"""

import csv
import json
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

import zoo
from zoo import predict
from zoo.data.datasets import FASHION_MNIST_CLASSES, get_dataset
from zoo.inference import Ensemble
from zoo.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINE = re.compile(r"  (\d+)\. (.+) \((\d+\.\d)%\)")
# The model's logits, compiled here (independently of zoo.inference).
APPLY = jax.jit(
    lambda model, variables, x: model.apply(variables, x, train=False), static_argnums=0
)


def short_config(path: str, steps: int, checkpoint_every: int):
    config = runpy.run_path(str(ROOT / path))["get_config"]()
    config.total_steps = steps
    config.data.eval_batch_size = 400  # divisible by the 8 test devices
    config.evals.every_steps = steps
    config.checkpoint.every_steps = checkpoint_every
    config.checkpoint.async_save = False
    config.logging.every_steps = steps
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(workdir at step 40, the same run at step 20, the run's final eval metrics)."""
    root = tmp_path_factory.mktemp("runs")
    results = loop.run(short_config("configs/default.py", 40, 20), root / "step40")
    shutil.copytree(root / "step40", root / "step20")
    shutil.rmtree(root / "step20" / "checkpoints" / "40")
    return root / "step40", root / "step20", results


@pytest.fixture(scope="module")
def binary_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("footwear")
    loop.run(short_config("configs/binary_footwear.py", 2, 2), workdir)
    return workdir


@pytest.fixture(scope="module")
def classifier(runs):
    return zoo.load_classifier(runs[0])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos as files: PNG, JPEG (colour) and a grayscale PNG, plus a corrupt file."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.jpg", quality=90)
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.jpeg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return folder


def good_photos(folder):
    return [folder / "astronaut.jpeg", folder / "chelsea.png", folder / "coffee.jpg"]


def test_workdir_gives_model_classes_task_and_preprocessing(classifier, runs):
    assert classifier.task == "multiclass" and classifier.threshold == 0.5
    assert classifier.class_names == list(FASHION_MNIST_CLASSES)
    assert classifier.description == f"resnet8 from {runs[0]} (step 40, fashion_mnist_mini)"
    assert zoo.load_classifier(runs[1]).description.endswith("(step 20, fashion_mnist_mini)")
    p = classifier.preprocessing
    assert (p.channels, p.stored_size, p.mean, p.std) == (1, (28, 28), (0.286,), (0.353,))


def test_accuracy_on_the_eval_split_equals_the_runs(classifier, runs):
    """The same preprocessing as training's eval pipeline: the classifier's accuracy on the
    2,000 embedded test images is the run's final eval accuracy (8 devices vs 1: at most one
    near-tie may flip)."""
    source = get_dataset("fashion_mnist_mini").source("eval")
    examples = [source[i] for i in range(len(source))]
    probabilities = classifier.probabilities([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    accuracy = float(np.mean(np.argmax(probabilities, -1) == labels))
    assert abs(accuracy - runs[2]["accuracy"]) <= 1 / len(examples), (accuracy, runs[2])
    assert accuracy > 0.3  # 40 steps learn something (chance is 0.1)


def test_colour_photo_becomes_what_the_model_saw(classifier):
    """Computed independently with Pillow: grayscale, short side to 28 (bilinear), central
    28x28 crop, Fashion-MNIST mean/std, the restored model, softmax."""
    photo = skimage.data.chelsea()  # 451x300 RGB
    gray = Image.fromarray(photo).convert("L").resize((42, 28), Image.Resampling.BILINEAR)
    pixels = np.asarray(gray, np.float32)[:, 7:35, None] / 255.0
    x = ((pixels - 0.286) / 0.353)[None]
    np.testing.assert_allclose(classifier.preprocess([photo]), x, atol=1e-6)
    logits = APPLY(classifier.model, classifier.variables, x)
    expected = np.asarray(jax.nn.softmax(logits, axis=-1))[0]
    np.testing.assert_allclose(classifier.probabilities(photo)[0], expected, atol=1e-5)


def test_probabilities_sum_to_one_and_top_k_is_ranked(classifier, photos):
    images = [*good_photos(photos), skimage.data.camera(), Image.fromarray(skimage.data.coffee())]
    probabilities = classifier.probabilities(images)
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    for row, ranked in zip(probabilities, classifier.predict(images, top_k=4), strict=True):
        values = [p for _, p in ranked]
        assert values == sorted(values, reverse=True) and len(values) == 4
        assert [label for label, _ in ranked][0] == FASHION_MNIST_CLASSES[int(np.argmax(row))]
        np.testing.assert_allclose(values, np.sort(row)[::-1][:4], atol=1e-7)
    # a photo differs from the others: the model looks at the pixels
    assert np.abs(probabilities[1] - probabilities[2]).max() > 1e-3


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror(classifier, photos):
    images = good_photos(photos)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    plain = classifier.probabilities(arrays)
    mirrored = classifier.probabilities([a[:, ::-1] for a in arrays])
    tta = classifier.probabilities(images, tta="flip")
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-4  # the mirror image changes something
    with pytest.raises(ValueError, match="tta must be None or one of flip"):
        classifier.probabilities(images, tta="rotate")


def test_ensemble_is_the_mean_of_its_members(classifier, runs, photos):
    images = good_photos(photos)
    other = zoo.load_classifier(runs[1])
    a, b = classifier.probabilities(images), other.probabilities(images)
    assert np.abs(a - b).max() > 1e-3  # step 20 and step 40 are different models
    np.testing.assert_allclose(Ensemble([classifier, other]).probabilities(images), (a + b) / 2)


def test_cli_prints_writes_json_csv_png_and_reports_the_bad_file(
    classifier, runs, photos, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["--workdir", str(runs[0]), "--top-k", "3", str(photos)]
    argv += ["--json", str(out / "p.json"), "--csv", str(out / "p.csv"), "--annotate", str(out)]
    out.mkdir()
    assert predict.main(argv) == 1
    stdout, stderr = capsys.readouterr()
    assert f"{photos / 'broken.jpg'}: cannot read image" in stderr
    header, *lines = stdout.splitlines()
    assert (
        header == f"# resnet8 from {runs[0]} (step 40, fashion_mnist_mini); multiclass, 10 classes"
    )
    paths = [str(p) for p in good_photos(photos)]  # the folder, sorted; broken.jpg left out
    assert lines[::4] == paths and len(lines) == 12
    api = classifier.predict(paths, top_k=3)
    for i, ranked in enumerate(api):
        matches = [LINE.fullmatch(line) for line in lines[4 * i + 1 : 4 * i + 4]]
        assert [m.group(1) for m in matches] == ["1", "2", "3"], lines
        assert [m.group(2) for m in matches] == [label for label, _ in ranked]
        assert [m.group(3) for m in matches] == [f"{100 * p:.1f}" for _, p in ranked]

    report = json.loads((out / "p.json").read_text())
    assert report["task"] == "multiclass" and len(report["errors"]) == 1
    assert [r["path"] for r in report["images"]] == paths
    for record, ranked in zip(report["images"], api, strict=True):
        assert [x["label"] for x in record["top_k"]] == [label for label, _ in ranked]
        got = [x["probability"] for x in record["top_k"]]
        np.testing.assert_allclose(got, [p for _, p in ranked], atol=1e-6)
        assert record["predicted"] == [ranked[0][0]]

    with open(out / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and [r["path"] for r in rows] == [p for p in paths for _ in range(3)]
    assert [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    assert [r["label"] for r in rows[3:6]] == [label for label, _ in api[1]]
    assert [r["predicted"] for r in rows[:3]] == ["1", "0", "0"]

    for name in ("astronaut", "chelsea", "coffee"):
        with Image.open(out / f"{name}.png") as png:
            png.verify()
        with Image.open(out / f"{name}.png") as png:
            assert png.format == "PNG" and 400 <= png.width <= 2000 and 200 <= png.height <= 1000
            assert np.asarray(png.convert("L")).std() > 10  # not a blank canvas
    assert not (out / "broken.png").exists()


def test_cli_ensemble_and_flip_tta_say_so_and_average(classifier, runs, photos, tmp_path, capsys):
    images = [str(p) for p in good_photos(photos)]
    json_path = tmp_path / "e.json"
    argv = ["--workdir", str(runs[0]), "--ensemble", str(runs[1]), "--tta", "flip", "--top-k", "10"]
    assert predict.main([*argv, "--json", str(json_path), *images]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("# ensemble of 2: resnet8 from") and header.endswith("; flip TTA")
    expected = (
        classifier.probabilities(images, tta="flip")
        + zoo.load_classifier(runs[1]).probabilities(images, tta="flip")
    ) / 2
    for record, row in zip(json.loads(json_path.read_text())["images"], expected, strict=True):
        got = {x["label"]: x["probability"] for x in record["top_k"]}
        np.testing.assert_allclose([got[n] for n in FASHION_MNIST_CLASSES], row, atol=1e-6)
    # repeating --workdir is the same ensemble
    assert predict.main(["--workdir", str(runs[0]), "--workdir", str(runs[1]), images[0]]) == 0
    assert capsys.readouterr().out.startswith("# ensemble of 2: ")


def test_binary_workdir_gives_sigmoid_probabilities(binary_workdir, photos):
    binary = zoo.load_classifier(binary_workdir)
    assert binary.task == "binary" and binary.class_names == ["not footwear", "footwear"]
    images = good_photos(photos)
    probabilities = binary.probabilities(images)
    x = binary.preprocess(images)
    logits = np.asarray(APPLY(binary.model, binary.variables, x))
    assert logits.shape == (3, 1)
    positive = 1 / (1 + np.exp(-logits[:, 0]))
    np.testing.assert_allclose(probabilities[:, 1], positive, atol=1e-6)
    np.testing.assert_allclose(probabilities[:, 0], 1 - positive, atol=1e-6)
    decided = [names[0] for names in binary.decide(probabilities)]
    assert decided == ["footwear" if p >= 0.5 else "not footwear" for p in positive]
    strict = zoo.load_classifier(binary_workdir, threshold=1.0)
    assert [names[0] for names in strict.decide(probabilities)] == ["not footwear"] * 3


def test_multilabel_sigmoid_per_label_and_labels_at_the_threshold(runs, photos, capsys):
    """A multi-label workdir: the step-20 checkpoint read as a model of the 2x2 mosaics
    (fashion_mnist_mini_mosaic: 10 labels, 56x56 images; a ResNet's weights fit any size)."""
    workdir = runs[1].parent / "as_mosaic"
    if not workdir.exists():
        shutil.copytree(runs[1], workdir)
        config = json.loads((workdir / "config.json").read_text())
        config["data"]["name"] = "fashion_mnist_mini_mosaic"
        config["method"]["threshold"] = 0.3
        (workdir / "config.json").write_text(json.dumps(config))
    multilabel = zoo.load_classifier(workdir)
    assert (multilabel.task, multilabel.threshold) == ("multilabel", 0.3)
    assert multilabel.preprocessing.stored_size == (56, 56)
    images = [str(p) for p in good_photos(photos)]
    probabilities = multilabel.probabilities(images)
    logits = np.asarray(
        APPLY(multilabel.model, multilabel.variables, multilabel.preprocess(images))
    )
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), atol=1e-6)
    assert np.abs(probabilities.sum(-1) - 1).max() > 0.05  # not a softmax
    expected = [[FASHION_MNIST_CLASSES[i] for i in np.flatnonzero(p >= 0.3)] for p in probabilities]
    assert multilabel.decide(probabilities) == expected

    assert predict.main(["--workdir", str(workdir), "--top-k", "2", *images]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.endswith("; multilabel, 10 classes; threshold 0.3")
    for i, labels in enumerate(expected):
        assert lines[4 * i] == images[i]
        assert lines[4 * i + 3] == f"  labels at/above threshold 0.3: {', '.join(labels) or 'none'}"


def test_python_m_zoo_predict_on_the_binary_workdir(binary_workdir, photos):
    chelsea = str(photos / "chelsea.png")
    result = subprocess.run(
        [sys.executable, "-m", "zoo.predict", "--workdir", str(binary_workdir), chelsea],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    header, path, first, second, decision = result.stdout.splitlines()
    assert header.endswith("fashion_mnist_mini_footwear); binary, 2 classes; threshold 0.5")
    assert path == chelsea
    (_, label1, p1), (_, label2, p2) = (LINE.fullmatch(x).groups() for x in (first, second))
    assert {label1, label2} == {"footwear", "not footwear"}
    assert float(p1) >= float(p2) and abs(float(p1) + float(p2) - 100.0) <= 0.11
    assert decision == f"  predicted at threshold 0.5: {label1}"


def test_inputs_files_folders_and_globs(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.png", "a/deep/y.JPG", "a/notes.txt", "b.jpeg"):
        (tmp_path / name).write_bytes(b"")
    paths, errors = predict.expand_inputs(
        [str(tmp_path / x) for x in ("a", "*.jpeg", "missing.png", "nothing*.png")]
    )
    assert paths == [
        str(tmp_path / "a/deep/y.JPG"),
        str(tmp_path / "a/x.png"),
        str(tmp_path / "b.jpeg"),
    ]
    assert errors == [
        f"{tmp_path / 'missing.png'}: no such file or folder",
        f"{tmp_path / 'nothing*.png'}: no file matches",
    ]


def test_errors_name_the_path_and_the_fix(runs, binary_workdir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        zoo.load_classifier(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no checkpoint .*python train.py --workdir="):
        zoo.load_classifier(tmp_path)
    with pytest.raises(ValueError, match="model='resnet20' but .* trained 'resnet8'"):
        zoo.load_classifier(runs[0], model="resnet20")
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="is a weights file: .*model=<registry name>"):
        zoo.load_classifier(weights)
    # a checkpoint whose config.json says another number of classes
    edited = tmp_path / "edited"
    shutil.copytree(runs[1], edited)
    config = json.loads((edited / "config.json").read_text())
    config["data"]["name"] = "fashion_mnist_mini_footwear"
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit .*\n  params/fc/bias: \(10,\) in the"):
        zoo.load_classifier(edited)

    assert predict.main(["x.png"]) == 2
    assert "give --workdir W" in capsys.readouterr().err
    assert predict.main(["--weights", str(weights), "x.png"]) == 2
    assert "also give --model NAME" in capsys.readouterr().err
    assert predict.main(["x", "--workdir", str(runs[1]), "--ensemble", str(binary_workdir)]) == 2
    assert "ensemble members must have the same task and classes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--workdir", str(runs[1]), "--top-k", "0", "x.png"])
    assert exit_info.value.code == 2
