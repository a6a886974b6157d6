"""What `import zoo` does to a process: it appends zoo's XLA:CPU flags to XLA_FLAGS and nothing
else (no heavy imports, no Pillow setting, no glibc setting); the allocator changes only when an
entry point asks (zoo/cpu/allocator.py). Each check runs in a fresh interpreter."""

import io
import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageFile

import zoo
from zoo.data.decode import ImageDecodeError, decode_image

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Never imported by `import zoo`; the last five not by zoo.create_model and a forward pass either.
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "torch", "PIL", "tensorflow", "grain")
NOT_FOR_MODELS = ("orbax", "torch", "PIL", "tensorflow", "tensorflow_datasets", "grain")

# Page faults of four 64 MiB blocks, each malloc'ed, written and freed as XLA:CPU does with a
# step's temporaries: glibc's defaults map every block afresh (above its largest mmap
# threshold, 32 MiB), so all 16384 pages fault in again; zoo's settings keep the freed block
# in the heap and the later blocks fault (almost) nothing.
FAULT_PROBE = """
def page_faults():
    import ctypes, resource

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size, faults = 64 << 20, []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        libc.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults
"""
GLIBC_DEFAULTS, REUSE = 8000, 2000  # bounds on the faults of the probe's blocks 3 and 4
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc: Linux only")


def run_python(code: str, *args: str, **env: str) -> dict:
    """Runs `code` with `args` in a fresh interpreter whose environment has no XLA_FLAGS and
    no ZOO_* variable (plus `env`); returns what it printed after "RESULT " as JSON."""
    clean = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("ZOO_")}
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**clean, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


LIFE_OF_A_PROCESS = (
    FAULT_PROBE
    + """
import io, json, sys
import zoo
kept = lambda: zoo.cpu.allocator.kept
seen = {"import": {"modules": [m for m in HEAVY if m in sys.modules], "kept": kept()}}
seen["import"]["faults"] = page_faults()
import jax, jax.numpy as jnp
model = zoo.create_model("resnet8", num_classes=10)
images = jnp.zeros((2, 32, 32, 3))
shapes = jax.eval_shape(lambda key: model.init(key, images, train=False), jax.random.key(0))
variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
forward = jax.jit(  # compiled fast: what matters is that it runs
    lambda v: model.apply(v, images, train=False),
    compiler_options={"xla_backend_optimization_level": 0},
)
forward(variables).block_until_ready()
seen["model"] = {"modules": [m for m in NOT_FOR_MODELS if m in sys.modules], "kept": kept()}
seen["model"]["faults"] = page_faults()
from PIL import Image, ImageFile  # only now: the model must not have imported it
seen["model"]["truncated"] = ImageFile.LOAD_TRUNCATED_IMAGES
from zoo.data.decode import decode_image
encoded = io.BytesIO()
Image.new("RGB", (8, 8), "red").save(encoded, "JPEG")
decode_image(encoded.getvalue())
seen["decode"] = {"truncated": ImageFile.LOAD_TRUNCATED_IMAGES}
print("RESULT " + json.dumps(seen))
"""
)


@pytest.fixture(scope="module")
def life_of_a_process() -> dict:
    """`import zoo`, then a model's forward pass, then an image decoded by zoo: what each left."""
    preamble = f"HEAVY = {HEAVY!r}\nNOT_FOR_MODELS = {NOT_FOR_MODELS!r}\n"
    return run_python(preamble + LIFE_OF_A_PROCESS)


def test_import_zoo_imports_no_heavy_dependency(life_of_a_process):
    assert life_of_a_process["import"]["modules"] == []
    # a model needs JAX and Flax, not checkpoints, images, datasets or PyTorch
    assert life_of_a_process["model"]["modules"] == []


def test_pillow_setting_is_left_alone(life_of_a_process):
    # after `import zoo`: test_import_zoo_only_appends_its_xla_flags
    for stage in ("model", "decode"):
        assert life_of_a_process[stage]["truncated"] is False, stage


@linux_only
def test_glibc_settings_are_left_alone(life_of_a_process):
    for stage in ("import", "model"):
        seen = life_of_a_process[stage]
        assert seen["kept"] is False and min(seen["faults"][2:]) > GLIBC_DEFAULTS, (stage, seen)


@linux_only
@pytest.mark.parametrize("veto", [False, True])
def test_keep_freed_memory_reuses_freed_blocks(veto):
    code = FAULT_PROBE + (
        "import json, zoo\n"
        "returned = zoo.cpu.keep_freed_memory()\n"
        "kept = zoo.cpu.allocator.kept\n"
        "print('RESULT ' + json.dumps([returned, kept, page_faults()]))\n"
    )
    returned, kept, faults = run_python(code, **({"ZOO_KEEP_FREED_MEMORY": "0"} if veto else {}))
    if veto:  # nothing changed
        assert returned is False and kept is False and min(faults[2:]) > GLIBC_DEFAULTS, faults
    else:
        assert returned is True and kept is True and max(faults[2:]) < REUSE, faults


@pytest.mark.parametrize("theirs", [None, "--xla_cpu_enable_fast_math=false"])
@pytest.mark.parametrize("opted_out", [False, True])
def test_import_zoo_only_appends_its_xla_flags(theirs, opted_out):
    code = (
        "import json, os\n"
        "before = dict(os.environ)\n"
        "import zoo, zoo.cpu\n"
        "after = dict(os.environ)\n"
        "changed = {k: after.get(k) for k in before.keys() | after.keys() "
        "if before.get(k) != after.get(k)}\n"
        "flags = zoo.cpu.flags.cpu_flags(zoo.cpu.flags.cpu_vendor())\n"
        "from PIL import ImageFile\n"
        "print('RESULT ' + json.dumps([changed, flags, ImageFile.LOAD_TRUNCATED_IMAGES]))\n"
    )
    env = {"XLA_FLAGS": theirs} if theirs else {}
    opt_out = {"ZOO_XLA_DEFAULTS": "0"} if opted_out else {}
    changed, zoos, truncated = run_python(code, **env, **opt_out)
    assert truncated is False  # Pillow's default, imported after zoo
    if opted_out:
        assert changed == {}
    else:
        assert changed == {"XLA_FLAGS": f"{theirs} {zoos}" if theirs else zoos}


def test_public_names_resolve_lazily():
    assert sorted(zoo.__all__) == sorted(zoo._PUBLIC)
    for name in zoo.__all__:
        assert getattr(zoo, name) is not None
        assert name in dir(zoo)
    assert zoo.create_model is zoo.models.create_model
    with pytest.raises(AttributeError, match="no attribute 'creat_model'"):
        zoo.creat_model  # noqa: B018


def truncated_jpeg() -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        encoded, "JPEG"
    )
    return encoded.getvalue()[: len(encoded.getvalue()) // 2]


def test_truncated_image_is_an_error_whatever_the_pillow_setting(monkeypatch):
    # A user's own LOAD_TRUNCATED_IMAGES = True is theirs: zoo's decode still refuses the
    # truncated file and gives the setting back, also with decodes running in several threads.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data, errors = truncated_jpeg(), []

    def decode_many():
        for _ in range(20):
            try:
                decode_image(data)
            except ImageDecodeError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=decode_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 80 and all("truncated" in e for e in errors), errors[:3]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
