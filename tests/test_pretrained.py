"""timm parity and weight loading: converted timm weights give timm's logits.

A timm model with random weights (fixed seed, eval mode) is converted with
`zoo.load_pretrained`; flax logits on the same random batch must match timm's within 1e-4
(float32). torch/timm/safetensors are the [convert] extra, which CI installs: a missing torch
fails these tests rather than skipping them.
"""

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm_parity import logit_diff  # noqa: E402  (tests/ is on sys.path under pytest)

import zoo
from zoo.convert import main as convert_main
from zoo.convert import read_converted
from zoo.predict import main as predict_main

TOLERANCE = 1e-4  # max abs logit difference, float32


def timm_model(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A timm model in eval mode with seeded random weights, zero-initialised tensors
    (biases, LayerScale, zero-init BN scales) perturbed so that every weight matters."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.6, 1.1)  # logits O(1-10), not vanishing
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            elif (
                isinstance(module, torch.nn.Linear | torch.nn.LayerNorm) and module.bias is not None
            ):
                module.bias.normal_(0.0, 0.02)
        for name_, param in model.named_parameters():
            if name_.endswith("gamma") or "token" in name_:
                param.normal_(0.0, 0.1)
    return model


# Smallest of each family in CI; the rest with `pytest -m slow`. (family variant, input size)
FAST = {"resnet18", "resnet50", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"}
PARITY = [
    ("resnet18", 64),
    ("resnet50", 64),  # the bottleneck path
    ("resnet34", 64),
    ("resnext50_32x4d", 64),
    ("wide_resnet50_2", 64),
    ("vit_tiny_patch16_224", 224),
    ("vit_small_patch16_224", 224),
    ("vit_base_patch16_224", 224),
    ("vit_base_patch32_224", 224),
    ("vit_large_patch16_224", 224),
    ("deit_tiny_patch16_224", 224),
    ("deit_small_patch16_224", 224),
    ("deit_base_patch16_224", 224),
    ("deit_base_distilled_patch16_224", 224),
    ("swin_tiny_patch4_window7_224", 224),
    ("swin_small_patch4_window7_224", 224),
    ("swin_base_patch4_window7_224", 224),
    ("swin_base_patch4_window12_384", 384),
]


@pytest.mark.parametrize(
    "name,size",
    [p if p[0] in FAST else pytest.param(*p, marks=pytest.mark.slow) for p in PARITY],
)
def test_timm_parity(name, size):
    if name not in zoo.list_models():
        pytest.fail(f"{name} is not registered")
    assert logit_diff(name, timm_model(name), size) <= TOLERANCE


def test_torchvision_resnet18_parity():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x).numpy()
    variables = zoo.load_pretrained("resnet18", reference.state_dict())
    logits = zoo.create_model("resnet18").apply(
        variables, x.permute(0, 2, 3, 1).numpy(), train=False
    )
    assert np.abs(np.asarray(logits) - expected).max() <= TOLERANCE


def test_distilled_deit_parity_small_config():
    """The distillation token and averaged heads, on a 2-block model cheap enough for CI."""
    kw = dict(embed_dim=192, depth=2, num_heads=3, img_size=64)
    reference = timm_model("deit_base_distilled_patch16_224", **kw)
    assert logit_diff("deit_base_distilled_patch16_224", reference, 64, **kw) <= TOLERANCE
    # A module without model_name: found by class, both heads re-initialised for 5 classes.
    model = zoo.create_model("deit_base_distilled_patch16_224", num_classes=5, **kw)
    with pytest.warns(UserWarning, match=r"params\.head\.kernel.*params\.head_dist\.kernel"):
        variables = zoo.load_pretrained(model, reference.state_dict())
    assert variables["params"]["head_dist"]["kernel"].shape == (192, 5)


def test_vit_parity_at_384_from_224_weights():
    """Position embeddings resized on the fly match timm's dynamic_img_size resampling."""
    kw = dict(depth=2)
    reference = timm_model("vit_tiny_patch16_224", dynamic_img_size=True, **kw)
    assert logit_diff("vit_tiny_patch16_224", reference, 384, **kw) <= TOLERANCE


def test_swin_parity_at_other_size():
    """Swin laid out for 224 run at 96 px (padded windows, shift masks built for the input
    size), as timm's dynamic_img_size; a 2-stage config keeps it cheap."""
    kw = dict(depths=(2, 2), embed_dim=32, num_heads=(1, 2))
    reference = timm_model("swin_tiny_patch4_window7_224", dynamic_img_size=True, **kw)
    assert logit_diff("swin_tiny_patch4_window7_224", reference, 96, **kw) <= TOLERANCE


def test_vit_img_size_384_resizes_pos_embed_at_conversion():
    """224 weights into a model built for 384 equal the 224 model run at 384."""
    reference = timm_model("vit_tiny_patch16_224", depth=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 384, 384, 3))
    outputs = []
    for img_size in (224, 384):
        model = zoo.create_model("vit_tiny_patch16_224", depth=1, img_size=img_size)
        variables = zoo.load_pretrained(model, reference.state_dict(), input_size=img_size)
        outputs.append(jax.jit(model.apply, static_argnames="train")(variables, x, train=False))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


# --------------------------------------------------------------------------- load_pretrained


@pytest.fixture(scope="module")
def resnet18_state():
    return {k: v.numpy() for k, v in timm_model("resnet18").state_dict().items()}


def test_missing_and_unexpected_keys_are_named(resnet18_state):
    state = dict(resnet18_state)
    del state["layer2.0.conv1.weight"]
    state["extra_block.weight"] = np.ones(3, np.float32)
    with pytest.raises(ValueError) as error:
        zoo.load_pretrained("resnet18", state)
    message = str(error.value)
    assert "missing: params.layer2_0.conv1.kernel" in message
    assert "unexpected: params.extra_block.scale" in message


def test_shape_mismatch_names_the_parameter(resnet18_state):
    state = dict(resnet18_state)
    state["layer3.1.bn2.weight"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match=r"shape mismatch for params\.layer3_1\.bn2\.scale"):
        zoo.load_pretrained("resnet18", state)


def test_head_is_reinitialised_for_other_num_classes(resnet18_state):
    with pytest.warns(UserWarning, match="re-initialised classifier head"):
        variables = zoo.load_pretrained("resnet18", resnet18_state, num_classes=10)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    assert not np.any(variables["params"]["fc"]["kernel"])  # zeros: uniform predictions
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"], resnet18_state["conv1.weight"].transpose(2, 3, 1, 0)
    )
    # A built module with another head works the same; num_classes=0 drops the head.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features = zoo.load_pretrained(zoo.create_model("resnet18", num_classes=0), resnet18_state)
    assert "fc" not in features["params"]


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_wrapped"])
def test_weight_files_round_trip(tmp_path, resnet18_state, fmt):
    tensors = {k: torch.from_numpy(v) for k, v in resnet18_state.items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(tensors, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": tensors, "epoch": 3} if fmt == "pth_wrapped" else tensors, path)
    from_file = zoo.load_pretrained("resnet18", path)
    from_dict = zoo.load_pretrained("resnet18", resnet18_state)
    jax.tree.map(np.testing.assert_array_equal, from_file, from_dict)


class WritesMarker:
    """Unpickling it writes `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "pwned"))


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_file(kind: str, folder: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    """A weights file whose loading with unrestricted pickle would write `marker`."""
    tensors = {"conv1.weight": torch.ones(2, 3, 1, 1)}
    if kind == "torch.save with __reduce__":
        path = folder / "evil.pth"
        torch.save({"state_dict": tensors, "payload": WritesMarker(marker)}, path)
    elif kind == "torch.save with os.system":
        path = folder / "evil.bin"
        torch.save({"state_dict": tensors, "payload": RunsShell(marker)}, path)
    elif kind == "plain pickle named .pt":
        path = folder / "evil.pt"
        path.write_bytes(pickle.dumps({"conv1.weight": np.ones(2), "x": WritesMarker(marker)}))
    elif kind == "torch.save of a class":
        path = folder / "popen.pth"
        torch.save({"state_dict": tensors, "obj": subprocess.Popen}, path)
    elif kind == "npz with an object array":
        path = folder / "evil.npz"
        np.savez(path, w=np.ones(2), payload=np.array([WritesMarker(marker)], dtype=object))
    elif kind == "pickle named .npz":
        path = folder / "pickle.npz"
        path.write_bytes(pickle.dumps({"w": WritesMarker(marker)}))
    else:  # ".pkl"
        path = folder / "weights.pkl"
        path.write_bytes(pickle.dumps({"w": WritesMarker(marker)}))
    return path


REFUSED = "is not a plain weights file"
PICKLES = {
    "torch.save with __reduce__": rf"{REFUSED}: unpickling it would call or build `getattr`, "
    r"which torch\.load\(weights_only=True\) refuses",
    "torch.save with os.system": rf"{REFUSED}: .*torch\.load\(weights_only=True\) refuses",
    "plain pickle named .pt": rf"{REFUSED}: .*torch\.load\(weights_only=True\) refuses",
    "torch.save of a class": rf"{REFUSED}: .*`[\w.]*Popen`.*weights_only=True",
    "npz with an object array": rf"{REFUSED}: array 'payload' holds Python objects \(dtype "
    r"object\), which zoo never unpickles \(np\.load\(allow_pickle=False\)\)",
    "pickle named .npz": rf"{REFUSED}: it is not an \.npz \(zip\) or \.npy file, and numpy "
    r"would read it as a Python pickle",
    ".pkl": r"unknown weights format '.*weights\.pkl': zoo reads \.safetensors, "
    r"\.pth/\.pt/\.bin/\.ckpt \(torch\.load with weights_only=True\) or \.npz",
}


def test_the_payloads_are_live(tmp_path):
    """The files below would write their marker if unpickled without restriction."""
    for payload in (WritesMarker, RunsShell):
        marker = tmp_path / f"{payload.__name__}.txt"
        pickle.loads(pickle.dumps(payload(marker)))
        assert marker.exists()


@pytest.mark.parametrize("kind", list(PICKLES))
def test_pickled_code_in_weights_is_refused_not_run(tmp_path, capsys, kind):
    """Every way zoo reads a weights file refuses pickled code with an error naming the
    file, and the code never runs (no marker file)."""
    marker = tmp_path / "marker.txt"
    path = evil_file(kind, tmp_path, marker)
    message = f"{re.escape(str(path))}.*{PICKLES[kind]}" if kind != ".pkl" else PICKLES[kind]
    with pytest.raises(ValueError, match=message):
        zoo.load_state_dict(path)
    with pytest.raises(ValueError, match=message):
        zoo.load_pretrained("resnet18", path)
    with pytest.raises(ValueError, match=message):
        zoo.load_classifier(path, model="resnet18")
    assert predict_main(["--weights", str(path), "--model", "resnet18", "x.png"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not marker.exists()


def test_convert_cli_round_trip(tmp_path, resnet18_state):
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in resnet18_state.items()}, str(weights))
    out = tmp_path / "converted"
    metadata = convert_main(["--model", "resnet18", "--weights", str(weights), "--out", str(out)])
    variables, saved = read_converted(str(out))
    assert saved == json.loads(json.dumps(metadata))
    assert saved["pretrained"]["timm_name"] == "resnet18.a1_in1k"
    expected = zoo.load_pretrained("resnet18", resnet18_state)
    jax.tree.map(np.testing.assert_array_equal, variables, jax.tree.map(np.asarray, expected))


def test_convert_cli_runs_as_module(tmp_path, resnet18_state):
    weights = tmp_path / "resnet18.npz"  # .npz: the subprocess needs no torch import
    np.savez(weights, **resnet18_state)
    result = subprocess.run(
        [sys.executable, "-m", "zoo.convert", "--model", "resnet18", "--weights", str(weights)]
        + ["--out", str(tmp_path / "out"), "--num-classes", "10"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    variables, metadata = read_converted(str(tmp_path / "out"))
    assert metadata["num_classes"] == 10 and variables["params"]["fc"]["kernel"].shape == (512, 10)
