"""Numeric precision: which Keras dtype policy a run computes in, and why.

Mixed precision keeps variables in float32 and computes in a 16-bit type. It
pays only where the hardware has a fast 16-bit path: bfloat16 on CPUs with
AVX512-BF16 or AMX and on GPUs of compute capability >= 8.0 (Ampere and later),
float16 on older GPUs (tensor cores since Volta; it needs loss scaling because
its range is small, which Keras' ``compile`` adds). Elsewhere bfloat16 is emulated and is no faster than
float32: on an AVX2-only CPU the VGG16 conv base ran at the same 3.3 img/s
both ways and a bf16 matmul was 0.77x float32 (docs/benchmarks.md), so `auto`
picks float32 there.

Only the conv base (blocks 1-5) computes in the chosen policy. The dense head
computes in float32 under every policy (its layers are built so): measured on an
AVX512-BF16 CPU, the heads cost the same either way, and a bfloat16 head made
scenario A's final fit another random draw (other dropout masks) rather than a
worse model; with a float32 head, heads trained on bfloat16-extracted features
match float32 ones within 0.002 AUC per seed (docs/benchmarks.md). The bag's
average is float32 too. `parts` says which part computes in what.
"""

import contextlib
import dataclasses
import logging
from typing import Iterable, Optional, Sequence, Tuple

import keras

from small_photo_classifier.pipeline.errors import ConfigError

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
CHOICES = ("auto",) + POLICIES
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class Precision:
    """A resolved precision: the Keras policy name and the reason it was chosen."""
    policy: str
    reason: str


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def gpu_capabilities() -> Tuple[Tuple[int, int], ...]:
    """Compute capability (major, minor) of each visible GPU."""
    import tensorflow as tf
    caps = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        caps.append(tuple(details.get("compute_capability", (0, 0))))
    return tuple(caps)


def choose(requested: str = "auto", flags: Optional[Iterable[str]] = None,
           gpus: Optional[Sequence[Tuple[int, int]]] = None) -> Precision:
    """Resolves ``--precision``; ``flags`` and ``gpus`` default to this machine's.

    ``auto``: on GPUs, mixed_bfloat16 when every GPU has compute capability >= 8.0,
    else mixed_float16 (>= 7.0) or float32; on CPUs, mixed_bfloat16 with
    AVX512-BF16 or AMX, else float32.
    """
    requested = (requested or "auto").strip().lower()
    if requested not in CHOICES:
        raise ConfigError(f"--precision={requested!r}: choose one of {', '.join(CHOICES)}.")
    if requested != "auto":
        return Precision(requested, "requested with --precision")
    gpus = gpu_capabilities() if gpus is None else tuple(gpus)
    if gpus:
        lowest = min(gpus)
        where = f"{len(gpus)} GPU(s), lowest compute capability {lowest[0]}.{lowest[1]}"
        if lowest >= (8, 0):
            return Precision("mixed_bfloat16", f"auto: {where} (bfloat16 tensor cores)")
        if lowest >= (7, 0):
            return Precision("mixed_float16", f"auto: {where} (float16 tensor cores, no "
                                              "bfloat16; training uses loss scaling)")
        return Precision("float32", f"auto: {where} (no 16-bit tensor cores)")
    flags = cpu_flags() if flags is None else frozenset(flags)
    found = [f for f in _BF16_CPU_FLAGS if f in flags]
    if found:
        return Precision("mixed_bfloat16", f"auto: CPU with {' and '.join(found)}")
    return Precision("float32", "auto: CPU without AVX512-BF16 or AMX, where bfloat16 is "
                                "emulated and no faster than float32")


def compile_convs(policy: Optional[str] = None, gpus: Optional[bool] = None) -> bool:
    """Whether conv blocks that train run XLA-compiled (`backbone.CompiledConvs`): on a
    CPU in float32. Not in mixed bfloat16, where TensorFlow's own convolutions use
    oneDNN's bfloat16 kernels and XLA's ran 3.2x slower (scenario C's step, 64 vs 20 ms
    per image on AVX512-BF16); not on GPUs, where it was never measured. ``policy``
    and ``gpus`` default to the global Keras policy and this machine."""
    if policy is None:
        policy = keras.mixed_precision.global_policy().name
    if gpus is None:
        import tensorflow as tf
        gpus = bool(tf.config.list_physical_devices("GPU"))
    return policy == "float32" and not gpus


def apply(precision: Precision) -> None:
    """Sets the global Keras policy: layers built from now on compute in it."""
    keras.mixed_precision.set_global_policy(precision.policy)
    logging.info("Precision: %s (%s).", precision.policy, precision.reason)


@contextlib.contextmanager
def global_policy(policy: str):
    """The global Keras policy is ``policy`` inside the block and what it was after it:
    for code that builds layers whose dtype must not follow the run's precision (the
    exports, built in float32 whatever the run trained in)."""
    saved = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(saved)


def parts(policy: str) -> dict:
    """What computes in which dtype under ``policy`` (recorded in ``run_config.json``)."""
    return {"conv_base": policy, "fine_tuned_conv_blocks": policy, "head": "float32",
            "variables": "float32"}


def resolve_and_apply(requested: str) -> Precision:
    """`choose` then `apply`; returns the choice."""
    precision = choose(requested)
    apply(precision)
    return precision


def _retyped(config, policy: str, inside: Optional[str] = None):
    """A copy of a Keras config in which the conv base's layers (``block*``) compute in
    ``policy``; every other layer (the head, a probe, the bag's average) keeps its dtype."""
    if isinstance(config, list):
        return [_retyped(c, policy, inside) for c in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy" and isinstance(config.get("config"), dict):
        if not (inside or "").startswith("block"):
            return config
        return {**config, "config": {**config["config"], "name": policy}}
    layer = config.get("name") if isinstance(config.get("name"), str) else inside
    return {k: _retyped(v, policy, layer if k == "config" else inside)
            for k, v in config.items()}


def with_policy(model: keras.Model, policy: str) -> keras.Model:
    """The same functional model (same weights) computing in ``policy``.

    A saved model remembers the policy it was trained in; prediction on another
    machine should compute in that machine's precision. Weights are float32 under
    every policy, so they carry over unchanged.
    """
    if policy not in POLICIES:
        raise ConfigError(f"Unknown precision policy {policy!r}; choose from "
                          f"{', '.join(POLICIES)}.")
    rebuilt = model.__class__.from_config(_retyped(model.get_config(), policy))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def policies_of(model: keras.Model) -> dict:
    """Layer name -> compute dtype, for every leaf layer (nested models included)."""
    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.update(policies_of(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            out[layer.name] = layer.compute_dtype
    return out


_LOW = ("bfloat16", "float16")


def _float32_config(node):
    """``node`` (a saved model's config) with every dtype policy and tensor dtype float32."""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and isinstance(node.get("config"), dict):
            return {**node, "config": {**node["config"], "name": "float32"}}
        out = {}
        for key, value in node.items():
            if key == "dtype" and isinstance(value, str) and (
                    value in _LOW or value.startswith("mixed_")):
                out[key] = "float32"
            else:
                out[key] = _float32_config(value)
        return out
    if isinstance(node, list):
        return [_float32_config(v) for v in node]
    return node


def float32_copy(model: keras.Model) -> keras.Model:
    """``model`` itself when every layer computes in float32, else a float32 rebuild of
    it with the same weights (variables are float32 under every policy)."""
    if all(d == "float32" for d in policies_of(model).values()):
        return model
    with global_policy("float32"):
        rebuilt = model.__class__.from_config(_float32_config(model.get_config()))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def store_float32(path: str) -> None:
    """Rewrites the ``.keras`` file at ``path`` so that it tells Keras to compute in
    float32 everywhere.

    A model built under ``mixed_bfloat16`` saves that policy with each layer, and
    ``keras.saving.load_model`` would then compute in bfloat16 on any machine (emulated
    and slow without AVX512-BF16, and up to 0.005 away from the float32 exports made
    from it). Its weights are float32 already; only the architecture's dtypes change.
    The compute precision is the loading machine's choice (`predict.py --precision`)."""
    import json
    import zipfile
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries:
            if info.filename == "config.json":
                data = json.dumps(_float32_config(json.loads(data))).encode("utf-8")
            z.writestr(info, data)
