"""zoo.backend: the XLA:CPU flags zoo appends at import, in fresh processes (XLA reads its
flags once, when the backend starts)."""

import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import backend

PROBE = """
import json, os, warnings
warnings.simplefilter("always")
{before}
with warnings.catch_warnings(record=True) as caught:
    import zoo
import jax
from zoo import backend
print("RESULT " + json.dumps({{
    "flags": os.environ.get("XLA_FLAGS", ""),
    "devices": jax.device_count(),
    "ynn_convolutions": backend.ynn_convolutions(),
    "warned": any("imported after JAX started" in str(w.message) for w in caught),
}}))
"""


def run_script(script: str, **env) -> dict:
    """Run `script` in a fresh process without the caller's XLA_FLAGS/opt-out (plus `env`);
    returns the JSON it prints after "RESULT "."""
    dropped = ("XLA_FLAGS", backend.OPT_OUT, backend.KEEP_OPT_OUT)
    clean = {k: v for k, v in os.environ.items() if k not in dropped}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**clean, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def probe(before: str = "", **env) -> dict:
    return run_script(PROBE.format(before=before), **env)


def test_appends_to_the_users_flags():
    out = probe(XLA_FLAGS="--xla_force_host_platform_device_count=3")
    zoos = backend.cpu_flags(backend.cpu_vendor())
    assert out["flags"] == f"--xla_force_host_platform_device_count=3 {zoos}"
    assert out["devices"] == 3  # the user's flag still applies
    assert out["ynn_convolutions"] is False and not out["warned"]


def test_the_users_own_setting_and_the_opt_out_are_kept():
    own = f"{backend.YNN_FLAG}=individual_dot,individual_convolution"
    out = probe(XLA_FLAGS=own)
    assert out["flags"] == own and out["ynn_convolutions"] is True
    out = probe(**{backend.OPT_OUT: "0"})
    assert out["flags"] == "" and out["ynn_convolutions"] is True  # jaxlib's default
    own = f"{backend.ONEDNN_FLAG}=individual_dot"  # a oneDNN setting of theirs, too
    assert probe(XLA_FLAGS=own)["flags"] == own


def test_late_import_warns_and_changes_nothing():
    out = probe(before="import jax; jax.devices()")
    assert out["warned"] and out["flags"] == ""


def test_matmul_library_by_cpu_vendor():
    # Intel: matmuls to oneDNN, reductions to YNNPACK; elsewhere both to YNNPACK
    intel = backend.cpu_flags("GenuineIntel").split()
    assert intel == [
        f"{backend.YNN_FLAG}=reduce",
        "--xla_cpu_use_onednn=true",
        f"{backend.ONEDNN_FLAG}=individual_dot",
    ]
    for vendor in ("AuthenticAMD", ""):
        assert backend.cpu_flags(vendor) == f"{backend.YNN_FLAG}=individual_dot,reduce"


ONEDNN_PROBE = """
import json
import numpy as np
import zoo, jax, jax.numpy as jnp

def loss(w1, w2, x):  # a dense layer, then attention-shaped batched matmuls
    h = jnp.tanh(x @ w1)  # [B, N, D]
    a = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", h, h), axis=-1)
    return jnp.sum(jnp.einsum("bqk,bkd->bqd", a, h) @ w2)

rng = np.random.default_rng(0)
args = [rng.standard_normal(s).astype(np.float32) / 4 for s in ((32, 48), (48, 8), (3, 40, 32))]
grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
hlo = grad.lower(*args).compile().as_text()
value, grads = grad(*args)
plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)),
                compiler_options={"xla_cpu_experimental_onednn_fusion_type": ""})  # XLA's dots
ref_value, ref_grads = plain(*args)
print("RESULT " + json.dumps({
    "onednn_fusions": hlo.count('"__onednn_fusion"'),
    "plain_fusions": plain.lower(*args).compile().as_text().count('"__onednn_fusion"'),
    "value": [float(value), float(ref_value)],
    "grad_error": max(float(jnp.abs(g - r).max() / jnp.abs(r).max())
                      for g, r in zip(grads, ref_grads)),
}))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="jaxlib has oneDNN on x86-64 only")
def test_onednn_matmuls_equal_xlas():
    # zoo's Intel flags, in a process on any x86-64 CPU: the dots of a dense layer and of
    # attention, forward and backward, run in oneDNN and equal XLA's own to float32 round-off
    out = run_script(ONEDNN_PROBE, XLA_FLAGS=backend.cpu_flags("GenuineIntel"))
    assert out["onednn_fusions"] >= 6 and out["plain_fusions"] == 0, out
    np.testing.assert_allclose(*out["value"], rtol=1e-5)
    assert out["grad_error"] < 1e-5, out


def test_forward_matmuls_by_cpu_vendor():
    for vendor in ("GenuineIntel", "AuthenticAMD"):  # oneDNN has the matmuls
        assert backend.forward_matmuls_in_onednn(vendor)
        assert backend.forward_ynn_fusion_type(vendor) == ""
    assert not backend.matmuls_in_onednn("AuthenticAMD")  # but not the train steps'
    assert not backend.forward_matmuls_in_onednn("")  # elsewhere (aarch64) YNNPACK has them
    assert backend.forward_ynn_fusion_type("") == backend.FORWARD_YNN_FUSION_TYPE
    vendor = backend.cpu_vendor()
    if os.path.exists("/proc/cpuinfo") and os.uname().machine == "x86_64":
        assert vendor.isalpha() and len(vendor) == 12  # cpuid's 12-character vendor string


@pytest.mark.parametrize(
    "flags, types",
    [
        ("", {"individual_dot", "individual_convolution", "reduce"}),
        (f"--a=1 {backend.YNN_FLAG}=individual_dot", {"individual_dot"}),
        (f"{backend.YNN_FLAG}=dot {backend.YNN_FLAG}=", set()),  # the last one wins
    ],
)
def test_fusion_types_parsed(monkeypatch, flags, types):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert backend.ynn_fusion_types() == types


FORWARD_PROBE = """
import json, re
import zoo, jax, jax.numpy as jnp
from zoo import backend

def layer_norm_dense(x, w):  # a reduction (LayerNorm) feeding a matmul
    x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
    return x @ w

def reductions_in_ynnpack(options):
    args = jnp.ones((256, 64)), jnp.ones((64, 128))
    hlo = jax.jit(layer_norm_dense, compiler_options=options).lower(*args).compile().as_text()
    bodies = dict(re.findall(r"(?ms)^%?([\\w.-]+) [^\\n]*\\{\\n(.*?)^\\}", hlo))
    called = re.findall(r"ynn_fusion[\\w.]* = .*?calls=%?([\\w.-]+)", hlo)
    return sum(" reduce(" in bodies.get(name, "") for name in called)

def onednn_matmuls(options):
    args = jnp.ones((256, 64)), jnp.ones((64, 128))
    hlo = jax.jit(layer_norm_dense, compiler_options=options).lower(*args).compile().as_text()
    return hlo.count('"kind":"__onednn_fusion"')

def windowed_reductions(options):  # over 384 features, as vit_small's LayerNorm
    args = jnp.ones((256, 384)), jnp.ones((384, 128))
    hlo = jax.jit(layer_norm_dense, compiler_options=options).lower(*args).compile().as_text()
    return hlo.count("reduce-window(")

options = backend.forward_compiler_options()
print("RESULT " + json.dumps({
    "options": options,
    "default": reductions_in_ynnpack({}),
    "forward": reductions_in_ynnpack(options),
    "windows_left_in": windowed_reductions({backend.YNN_OPTION: backend.FORWARD_YNN_FUSION_TYPE}),
    "forward_windows": windowed_reductions(options),
    "onednn_default": onednn_matmuls({}),
    "onednn_forward": onednn_matmuls(options),
}))
"""


def forward_probe(**env) -> dict:
    return run_script(FORWARD_PROBE, **env)


def test_forward_programs_keep_reductions_out_of_ynnpack():
    # zoo's flag: training programs hand reductions (here the LayerNorm's) to YNNPACK, zoo's
    # forward-only programs (compiled with forward_compiler_options) leave them to XLA.
    out = forward_probe()
    vendor = backend.cpu_vendor()
    forward_type = backend.forward_ynn_fusion_type(vendor)
    onednn = backend.ONEDNN_OPTIONS if backend.forward_matmuls_in_onednn(vendor) else {}
    assert out["options"] == {
        backend.YNN_OPTION: forward_type,
        **onednn,
        backend.DISABLE_PASSES_OPTION: backend.FORWARD_DISABLED_PASSES,
    }
    assert out["default"] >= 1 and out["forward"] == 0
    # the matmul in oneDNN on Intel and AMD CPUs: in every program on Intel's, in forward
    # programs only on AMD's
    assert out["onednn_forward"] == (1 if onednn else 0), out
    assert out["onednn_default"] == (1 if backend.matmuls_in_onednn(vendor) else 0), out
    # and their reductions are single passes, not sums over windows of 32 and then of those
    assert out["windows_left_in"] >= 1 and out["forward_windows"] == 0
    # passes the user disables themselves are left alone
    theirs = forward_probe(XLA_FLAGS="--xla_disable_hlo_passes=algsimp")["options"]
    assert theirs == {backend.YNN_OPTION: forward_type, **onednn}
    # the opt-out and a user's own flag: no per-program options, the process setting rules
    assert forward_probe(**{backend.OPT_OUT: "0"})["options"] == {}
    own = forward_probe(XLA_FLAGS=f"{backend.YNN_FLAG}=individual_dot,individual_convolution")
    assert own["options"] == {}


FAULT_PROBE = """
import ctypes, json, resource
import zoo
from zoo import backend

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 64 << 20  # a step's temporary block, as XLA:CPU mallocs and frees it every execution
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("RESULT " + json.dumps({"faults": faults, "kept": backend.freed_memory_kept}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    # Without zoo's allocator settings glibc maps each 64 MiB block afresh (above its largest
    # dynamic mmap threshold, 32 MiB) and every 4 KiB page of it faults in again (16384); with
    # them the freed block stays in the heap and the next one reuses it. This probes glibc
    # directly: through XLA, other allocations between steps sometimes split the freed block
    # and the heap grows instead (README, Speed: ~3x one block on a 2-core Zen4).
    assert backend.keep_freed_memory() is True
    kept = run_script(FAULT_PROBE)
    assert kept["kept"] is True and max(kept["faults"][2:]) < 2000, kept
    for opt_out in (backend.OPT_OUT, backend.KEEP_OPT_OUT):
        plain = run_script(FAULT_PROBE, **{opt_out: "0"})
        assert plain["kept"] is False and min(plain["faults"][2:]) > 8000, (opt_out, plain)


@pytest.mark.parametrize("in_branches", [True, False])
def test_transposed_buffer(monkeypatch, in_branches):
    # the value is the transpose (of the last two axes), with and without the switch
    import jax
    import jax.numpy as jnp
    import numpy as np

    monkeypatch.setattr(backend, "TRANSPOSE_IN_BRANCHES", in_branches)
    x = jnp.arange(2 * 6 * 4, dtype=jnp.float32).reshape(2, 6, 4)
    out = jax.jit(backend.transposed_buffer)(x)
    np.testing.assert_array_equal(out, np.swapaxes(np.asarray(x), 1, 2))

    # What the switch is for (on CPU): the conditional takes the producer's result in its
    # plain [6, 4] layout; with the transpose outside the branches, XLA:CPU hands it the
    # transposed [4, 6] with a column-major layout ({0,1}), which the producer writes strided.
    def kernel_gradient(a):
        return backend.transposed_buffer(a * 2.0) @ jnp.ones((6, 3))

    hlo = jax.jit(kernel_gradient).lower(x[0]).compile().as_text()
    conditional = next(line for line in hlo.splitlines() if " conditional(" in line)
    operand = conditional.split(" conditional(")[1].split(",")[1].strip()  # the branch tuple
    defined = next(line for line in hlo.splitlines() if f"{operand} = " in line)
    assert ("f32[6,4]{1,0}" in defined) == in_branches, defined


def test_once_compiler_options_give_the_same_parameters(monkeypatch):
    # LLVM at -O1 for a program that runs once: less compile time, the same bits.
    model = zoo.create_model("resnet8", num_classes=10)
    rng = jax.random.PRNGKey(3)

    def init(r):
        return model.init({"params": r}, jnp.zeros((2, 28, 28, 1)), train=False)

    options = backend.once_compiler_options()
    assert options == {"xla_backend_optimization_level": backend.ONCE_OPTIMIZATION_LEVEL}
    once = jax.jit(init, compiler_options=options)(rng)
    default = jax.jit(init)(rng)
    for got, want in zip(jax.tree.leaves(once), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(got, want)
    monkeypatch.setenv(backend.OPT_OUT, "0")
    assert backend.once_compiler_options() == {}
