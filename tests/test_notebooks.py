"""notebooks/*.ipynb: kept without outputs, and executed top to bottom by a Jupyter kernel
(nbclient), checking what each shows; and `loop.run`'s `on_metrics`, which the quickstart's
live plot uses.

Each execution gets a cell after the `parameters` cell (papermill's injection) that sends its
workdirs to tmp_path and, in the default run, shrinks the training to seconds; the `slow`
variants run each notebook's own small settings (a few minutes on a 2-core CPU). A last cell
prints, as JSON, values the checks compare with the run's files. The kernel sees one CPU
device, as on a user's laptop (conftest.py's 8 devices are for the test process).
"""

import base64
import json
import math
import os
import pathlib
import re

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("compare_architectures", "quickstart", "self_supervised")
# CI: ~30-60 s per notebook on a 2-core CPU (every step of each notebook, in fewer steps).
SHRINK = {
    "quickstart": 'SMALL.update({"total_steps": 60, "evals.every_steps": 30})',
    "compare_architectures": 'SMALL.update({"total_steps": 5, "data.batch_size": 16})',
    "self_supervised": (
        'SMALL.update({"total_steps": 10, "evals.every_steps": 10, "data.batch_size": 64})'
    ),
}
# Printed as the last cell's JSON line (the notebook's variables, for the checks below).
REPORTS = {
    "quickstart": 'print(json.dumps({"workdir": str(workdir), "history": history}))',
    "compare_architectures": 'print(json.dumps({"workdir": str(workdir)}))',
    # The k-NN accuracy of the notebook's embeddings (the PCA's) with the training images
    # embedded the same way: the run's final k-NN when they are the features it evaluated.
    "self_supervised": """\
from zoo.training.feature_eval import knn_accuracy

train = spec.source("train", config.data)
train_pixels = ((train.images / 255.0 - np.array(spec.mean)) / np.array(spec.std)).astype(
    np.float32
)
train_embeddings = np.concatenate(
    [np.asarray(embed(variables, train_pixels[i : i + 500])) for i in range(0, len(train), 500)]
)
knn = config.evals.knn
accuracy = knn_accuracy(
    train_embeddings, train.labels, embeddings, labels, num_classes=10, k=knn.k,
    temperature=knn.temperature,
)
run = float(results["knn_accuracy"])
print(json.dumps({"workdir": str(workdir), "knn": float(accuracy), "run_knn": run}))""",
}


def parameters_index(nb) -> int:
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    return index


def execute(name: str, tmp_path: pathlib.Path, overrides: str = "", cwd: pathlib.Path = NOTEBOOKS):
    """The notebook executed in a fresh kernel started in `cwd`, with `overrides` injected
    after its parameters cell; returns (notebook, the last cell's JSON)."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    injected = f"RUNS = {str(tmp_path)!r}\n{overrides}"
    nb.cells.insert(parameters_index(nb) + 1, nbformat.v4.new_code_cell(injected))
    nb.cells.append(nbformat.v4.new_code_cell("import json\n\n" + REPORTS[name]))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # zoo's flags, 1 device
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)
    report = json.loads(stdout(nb.cells[-1]).strip().splitlines()[-1])
    return nb, report


def cell(nb, marker: str):
    """The code cell whose source contains `marker`."""
    (found,) = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    return found


def stdout(code_cell) -> str:
    return "".join(o.text for o in code_cell.outputs if o.get("name") == "stdout")


def pngs(code_cell) -> list[bytes]:
    images = [o.data["image/png"] for o in code_cell.outputs if "image/png" in o.get("data", {})]
    return [base64.b64decode(image) for image in images]


def search(pattern: str, text: str) -> re.Match:
    match = re.search(pattern, text)
    assert match, f"no {pattern!r} in:\n{text}"
    return match


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_notebooks_have_no_outputs():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.stem for p in paths] == list(NAMES)
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        for c in code:
            assert c.execution_count is None and c.outputs == [], (
                f"{path.name}: cell {c.id} keeps outputs; clear them before committing "
                f"(jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)})"
            )
        # One settings cell, the first code cell, with the switch to the full-size settings.
        assert code[0] is nb.cells[parameters_index(nb)]
        assert re.search(r"^FULL = False\b", code[0].source, re.MULTILINE)


def check_quickstart(nb, report, min_accuracy):
    photo = cell(nb, "skimage.data.coffee()")
    assert search(r"top-1: (.+) \(\d+\.\d%\)", stdout(photo))[1] == "espresso"
    assert len(pngs(photo)) == 1  # the photo beside its top-5 bars

    training = cell(nb, "loop.run(")
    match = search(r"final accuracy: (\d+\.\d+)% on (\d+) test images", stdout(training))
    assert float(match[1]) / 100 > min_accuracy and match[2] == "2000"
    assert len(pngs(training)) == 1  # the live plot, redrawn in place
    # The live plot drew every record of metrics.jsonl, in order.
    workdir = pathlib.Path(report["workdir"])
    assert report["history"] == read_jsonl(workdir / "metrics.jsonl")
    assert {r["split"] for r in report["history"]} == {"train", "eval"}

    confusion = cell(nb, "confusion_matrix.png")
    assert pngs(confusion) == [(workdir / "confusion_matrix.png").read_bytes()]

    predictions = cell(nb, "zoo.load_classifier(workdir)")
    assert search(r"test images: \d+ of (\d+) right", stdout(predictions))[1] == "12"
    assert len(pngs(predictions)) == 1


def check_compare(nb, report, min_best_accuracy):
    import zoo
    from zoo.models.cost import parameter_count

    results = cell(nb, "results.json")
    pattern = r"(\S+): accuracy (\S+)%, ([\d,]+) parameters, (\S+) MFLOPs, (\d+) s"
    rows = re.findall(pattern, stdout(results))
    assert [row[0] for row in rows] == ["resnet20", "convnext_atto_stem2_32", "vit_nano_patch4_32"]
    for name, accuracy, params, mflops, _ in rows:
        assert math.isfinite(float(accuracy)) and 0 <= float(accuracy) <= 100
        model = zoo.create_model(name, num_classes=10)
        assert int(params.replace(",", "")) == parameter_count(model, (32, 32, 1)), name
        assert float(mflops) > 0
    assert max(float(row[1]) for row in rows) / 100 > min_best_accuracy
    saved = json.loads((pathlib.Path(report["workdir"]) / "results.json").read_text())
    assert [row[0] for row in rows] == [row["model"] for row in saved["rows"]]
    assert len(pngs(cell(nb, "fig.suptitle(results"))) == 1


def check_self_supervised(nb, report, steps):
    floor = cell(nb, "baseline=")
    random_knn = float(search(r"at initialisation: (\d+\.\d+)%", stdout(floor))[1])

    curve = cell(nb, "read_jsonl(")
    points = re.findall(r"step (\d+) (\d+\.\d+)%", search(r"k-NN accuracy: .*", stdout(curve))[0])
    records = read_jsonl(pathlib.Path(report["workdir"]) / "metrics.jsonl")
    logged = [(r["step"], r["knn_accuracy"]) for r in records if r["split"] == "eval"]
    assert len(points) >= 2 and [int(s) for s, _ in points] == [0] + [s for s, _ in logged]
    assert float(points[0][1]) == random_knn and int(points[-1][0]) == steps
    for (_, shown), (_, value) in zip(points[1:], logged, strict=True):
        assert float(shown) == pytest.approx(100 * value, abs=0.005)
    assert 10 < random_knn < 100 and len(pngs(curve)) == 1

    pca = cell(nb, "np.linalg.svd(")
    text = stdout(pca)
    assert search(r"embeddings: \((\d+), \d+\)", text)[1] == "2000"
    assert float(search(r"spread (\d+\.\d+)", text)[1]) > 0.05  # collapsed: 0
    assert 0 < float(search(r"explain (\d+\.\d+)%", text)[1]) <= 100
    assert len(pngs(pca)) == 1
    # The PCA's embeddings are the features the run's k-NN evaluated: the same accuracy
    # (up to a few test images whose vote rounding differs).
    assert report["knn"] == pytest.approx(report["run_knn"], abs=0.005)


# Thresholds: 60 steps reach ~62% test accuracy, 300 steps ~76% (10% = chance); the
# comparison's best model ~31% after 5 steps of 16 and ~72% after 100 steps of 64.
def test_quickstart(tmp_path):
    check_quickstart(*execute("quickstart", tmp_path, SHRINK["quickstart"]), min_accuracy=0.3)


def test_compare_architectures(tmp_path):
    nb, report = execute("compare_architectures", tmp_path, SHRINK["compare_architectures"])
    check_compare(nb, report, min_best_accuracy=0.15)


def test_self_supervised(tmp_path):
    nb, report = execute("self_supervised", tmp_path, SHRINK["self_supervised"])
    check_self_supervised(nb, report, steps=10)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_small_settings_run_from_the_root(name, tmp_path):
    nb, report = execute(name, tmp_path, cwd=ROOT)  # only RUNS = tmp_path injected
    if name == "quickstart":
        check_quickstart(nb, report, min_accuracy=0.6)
    elif name == "compare_architectures":
        check_compare(nb, report, min_best_accuracy=0.5)
    else:
        check_self_supervised(nb, report, steps=60)


def test_on_metrics_gets_each_record_of_metrics_jsonl_in_order(tmp_path):
    from configs.default import get_config
    from zoo.training import loop

    config = get_config()
    config.update_from_flattened_dict(
        {
            "model.name": "resnet8",
            "total_steps": 4,
            "data.batch_size": 16,
            "evals.every_steps": 2,
            "logging.every_steps": 1,
            "checkpoint.every_steps": 4,
        }
    )
    seen = []
    loop.run(config, tmp_path, on_metrics=seen.append)
    assert seen == read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in seen] == [
        (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval"),
    ]  # fmt: skip


def test_zoos_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """zoo writes its PNGs without pyplot: a notebook's (or any caller's) backend stays, so
    the user's own figures still show after a training run or a prediction."""
    import matplotlib
    import numpy as np
    from PIL import Image

    from zoo.predict import annotate
    from zoo.training import metrics

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend other than the Agg that zoo's files are drawn with
    try:
        records = [{"step": 1, "split": "train", "loss": 1.0, "accuracy": 0.5}]
        metrics.plot_curves(records, tmp_path / "curves.png")
        metrics.plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "cm.png")
        row = {"model": "m", "family": "f", "accuracy": 0.5, "wall_minutes": 1.0, "params": 1e6}
        metrics.plot_comparison([row], tmp_path / "compare.png")
        annotate(np.zeros((8, 8, 3), np.uint8), [("x", 0.9)], tmp_path / "annotated.png", "t")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    for name in ["curves", "cm", "compare", "annotated"]:
        assert Image.open(tmp_path / f"{name}.png").format == "PNG"
