"""zoo.cpu: the XLA:CPU flags zoo appends at import, in fresh processes (XLA reads its flags
once, when the backend starts); the compiler options of forward and run-once programs; the
CPU policy: chosen per program, fixed per process, off the CPU for other devices."""

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
from zoo import cpu
from zoo.cpu import CpuPolicy, allocator, buffers, flags

PROBE = """
import json, os, warnings
warnings.simplefilter("always")
{before}
with warnings.catch_warnings(record=True) as caught:
    import zoo
import jax
from zoo import cpu
print("RESULT " + json.dumps({{
    "flags": os.environ.get("XLA_FLAGS", ""),
    "devices": jax.device_count(),
    "ynn_convolutions": cpu.default().ynn_convolutions,
    "warned": any("imported after JAX started" in str(w.message) for w in caught),
}}))
"""


def run_script(script: str, **env) -> dict:
    """Run `script` in a fresh process without the caller's XLA_FLAGS/opt-out (plus `env`);
    returns the JSON it prints after "RESULT "."""
    dropped = ("XLA_FLAGS", flags.OPT_OUT, allocator.OPT_OUT)
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
    zoos = flags.cpu_flags(flags.cpu_vendor())
    assert out["flags"] == f"--xla_force_host_platform_device_count=3 {zoos}"
    assert out["devices"] == 3  # the user's flag still applies
    assert out["ynn_convolutions"] is False and not out["warned"]


def test_the_users_own_setting_and_the_opt_out_are_kept():
    own = f"{flags.YNN_FLAG}=individual_dot,individual_convolution"
    out = probe(XLA_FLAGS=own)
    assert out["flags"] == own and out["ynn_convolutions"] is True
    out = probe(**{flags.OPT_OUT: "0"})
    assert out["flags"] == "" and out["ynn_convolutions"] is True  # jaxlib's default
    own = f"{flags.ONEDNN_FLAG}=individual_dot"  # a oneDNN setting of theirs, too
    assert probe(XLA_FLAGS=own)["flags"] == own


def test_late_import_warns_and_changes_nothing():
    out = probe(before="import jax; jax.devices()")
    assert out["warned"] and out["flags"] == ""


def test_matmul_library_by_cpu_vendor():
    # Intel: matmuls to oneDNN, reductions to YNNPACK; elsewhere both to YNNPACK
    intel = flags.cpu_flags("GenuineIntel").split()
    assert intel == [
        f"{flags.YNN_FLAG}=reduce",
        "--xla_cpu_use_onednn=true",
        f"{flags.ONEDNN_FLAG}=individual_dot",
    ]
    for vendor in ("AuthenticAMD", ""):
        assert flags.cpu_flags(vendor) == f"{flags.YNN_FLAG}=individual_dot,reduce"


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
    out = run_script(ONEDNN_PROBE, XLA_FLAGS=flags.cpu_flags("GenuineIntel"))
    assert out["onednn_fusions"] >= 6 and out["plain_fusions"] == 0, out
    np.testing.assert_allclose(*out["value"], rtol=1e-5)
    assert out["grad_error"] < 1e-5, out


def test_forward_matmuls_by_cpu_vendor():
    for vendor in ("GenuineIntel", "AuthenticAMD"):  # oneDNN has the matmuls
        assert flags.forward_matmuls_in_onednn(vendor)
        assert flags.forward_ynn_fusion_type(vendor) == ""
    assert not flags.matmuls_in_onednn("AuthenticAMD")  # but not the train steps'
    assert not flags.forward_matmuls_in_onednn("")  # elsewhere (aarch64) YNNPACK has them
    assert flags.forward_ynn_fusion_type("") == flags.FORWARD_YNN_FUSION_TYPE
    vendor = flags.cpu_vendor()
    if os.path.exists("/proc/cpuinfo") and os.uname().machine == "x86_64":
        assert vendor.isalpha() and len(vendor) == 12  # cpuid's 12-character vendor string


@pytest.mark.parametrize(
    "xla_flags, types",
    [
        ("", {"individual_dot", "individual_convolution", "reduce"}),
        (f"--a=1 {flags.YNN_FLAG}=individual_dot", {"individual_dot"}),
        (f"{flags.YNN_FLAG}=dot {flags.YNN_FLAG}=", set()),  # the last one wins
    ],
)
def test_fusion_types_parsed(monkeypatch, xla_flags, types):
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    assert flags.ynn_fusion_types() == types


FORWARD_PROBE = """
import json, re
import zoo, jax, jax.numpy as jnp
from zoo.cpu import flags

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

options = flags.forward_compiler_options("cpu")
print("RESULT " + json.dumps({
    "options": options,
    "default": reductions_in_ynnpack({}),
    "forward": reductions_in_ynnpack(options),
    "windows_left_in": windowed_reductions({flags.YNN_OPTION: flags.FORWARD_YNN_FUSION_TYPE}),
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
    vendor = flags.cpu_vendor()
    forward_type = flags.forward_ynn_fusion_type(vendor)
    onednn = flags.ONEDNN_OPTIONS if flags.forward_matmuls_in_onednn(vendor) else {}
    assert out["options"] == {
        flags.YNN_OPTION: forward_type,
        **onednn,
        flags.DISABLE_PASSES_OPTION: flags.FORWARD_DISABLED_PASSES,
    }
    assert out["default"] >= 1 and out["forward"] == 0
    # the matmul in oneDNN on Intel and AMD CPUs: in every program on Intel's, in forward
    # programs only on AMD's
    assert out["onednn_forward"] == (1 if onednn else 0), out
    assert out["onednn_default"] == (1 if flags.matmuls_in_onednn(vendor) else 0), out
    # and their reductions are single passes, not sums over windows of 32 and then of those
    assert out["windows_left_in"] >= 1 and out["forward_windows"] == 0
    # passes the user disables themselves are left alone
    theirs = forward_probe(XLA_FLAGS="--xla_disable_hlo_passes=algsimp")["options"]
    assert theirs == {flags.YNN_OPTION: forward_type, **onednn}
    # the opt-out and a user's own flag: no per-program options, the process setting rules
    assert forward_probe(**{flags.OPT_OUT: "0"})["options"] == {}
    own = forward_probe(XLA_FLAGS=f"{flags.YNN_FLAG}=individual_dot,individual_convolution")
    assert own["options"] == {}


@pytest.mark.parametrize("in_branches", [True, False])
def test_transposed_buffer(in_branches):
    # the value is the transpose (of the last two axes), with and without the policy's field
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.arange(2 * 6 * 4, dtype=jnp.float32).reshape(2, 6, 4)
    out = jax.jit(lambda x: buffers.transposed_buffer(x, in_branches))(x)
    np.testing.assert_array_equal(out, np.swapaxes(np.asarray(x), 1, 2))

    # What the field is for (on CPU): the conditional takes the producer's result in its
    # plain [6, 4] layout; with the transpose outside the branches, XLA:CPU hands it the
    # transposed [4, 6] with a column-major layout ({0,1}), which the producer writes strided.
    def kernel_gradient(a):
        return buffers.transposed_buffer(a * 2.0, in_branches) @ jnp.ones((6, 3))

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

    options = flags.once_compiler_options("cpu")
    assert options == {"xla_backend_optimization_level": flags.ONCE_OPTIMIZATION_LEVEL}
    once = jax.jit(init, compiler_options=options)(rng)
    default = jax.jit(init)(rng)
    for got, want in zip(jax.tree.leaves(once), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(got, want)
    assert flags.once_compiler_options("gpu") == flags.forward_compiler_options("gpu") == {}
    monkeypatch.setenv(flags.OPT_OUT, "0")
    assert flags.once_compiler_options("cpu") == {}


def test_two_policies_in_one_process_compile_two_programs_equal_to_xlas():
    # resnet8's train-mode gradient, traced with the default policy, with its convolution and
    # norm routes changed, and with XLA's native operations (None: what GPU and TPU get)
    model = zoo.create_model("resnet8", num_classes=10)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 1))
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    traces = []

    def loss(params):
        traces.append(cpu.current())
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    default = CpuPolicy()
    other = CpuPolicy(
        min_channels_for_winograd=16, batch_norm_vjp=False, pointwise_gradient_buffer=False
    )
    programs = {
        name: jax.jit(cpu.traced(jax.value_and_grad(loss), policy))
        for name, policy in (("default", default), ("other", other), ("native", None))
    }
    texts = {name: p.lower(variables["params"]).as_text() for name, p in programs.items()}
    assert traces == [default, other, None]  # one trace each, each under its own policy
    assert len(set(texts.values())) == 3
    assert texts["other"].count("dot_general") > texts["default"].count("dot_general")  # Winograd
    results = {name: p(variables["params"]) for name, p in programs.items()}
    (native_value, native_grads) = results.pop("native")
    for value, grads in results.values():
        np.testing.assert_allclose(value, native_value, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(native_grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


class FakeDevice:
    def __init__(self, platform):
        self.platform = platform


def test_policy_for_other_devices_is_xlas_own():
    policy = CpuPolicy(winograd=False)
    assert cpu.policy_for([FakeDevice("cpu")], policy) is policy
    assert cpu.policy_for([FakeDevice("gpu")], policy) is None
    assert cpu.policy_for([FakeDevice("tpu"), FakeDevice("tpu")]) is None
    assert cpu.policy_for([FakeDevice("cpu"), FakeDevice("gpu")], policy) is None
    sharded = cpu.policy_for([FakeDevice("cpu")] * 8, policy)  # attention slices would be cut
    assert (sharded.attention_slices, sharded.attention_gradient_slices) == (1, 1)
    assert not sharded.winograd
    with pytest.raises(TypeError, match="CpuPolicy"), cpu.using("fast"):
        pass


DEFAULT_PROBE = """
import json
import jax, jax.numpy as jnp
from zoo import cpu
from zoo.cpu import CpuPolicy
chosen = CpuPolicy.from_flags(winograd=False)
cpu.set_default(chosen)  # before any trace: allowed
seen = []
jax.jit(lambda x: seen.append(cpu.current()) or x * 2)(jnp.ones(3))  # a trace reads it
cpu.set_default(chosen)  # the same policy again: allowed
try:
    cpu.set_default(CpuPolicy.from_flags())
    error = ""
except RuntimeError as e:
    error = str(e)
print("RESULT " + json.dumps({"seen": seen[0] == chosen, "error": error}))
"""


def test_the_process_default_is_fixed_once_used():
    out = run_script(DEFAULT_PROBE)
    assert out["seen"] and "already used to trace a program" in out["error"], out
