"""The bag: the chosen scenario's K cross-validation fold heads plus the final model.

A member is the trainable layers of one fold's head at the chosen epoch, as
cross-validation left them (`features.cv`): nothing is trained twice. In the
exported Keras model (``bag.keras``) the frozen layers below the first trainable
one run once and are shared; each member is a copy of the part from there up,
and an ``Average`` layer (float32) combines them. Only plain layers: the bag
loads with ``safe_mode=True``.
"""

import os
from typing import Dict, List

import keras
import numpy as np

from features import backbone, scenarios
from pipeline.atomic import atomic_path
from pipeline.errors import ConfigError

Member = Dict[str, List[np.ndarray]]  # trainable layer name -> its weights


def trainable_layers(classifier: backbone.Classifier) -> List[keras.layers.Layer]:
    """The classifier's trainable layers with weights, in network order."""
    return [layer for layer in classifier.layers() if layer.trainable]


def as_member(classifier: backbone.Classifier, blocks, values: list) -> Member:
    """Names a flat list of the trainable weights of ``blocks`` (a trainer's variable
    order) by layer."""
    classifier.set_trainable(blocks, log=False)
    member, i = {}, 0
    for layer in trainable_layers(classifier):
        count = len(layer.trainable_weights)
        member[layer.name] = [np.asarray(v) for v in values[i:i + count]]
        i += count
    if i != len(values):
        raise ValueError(f"{len(values)} weights for {i} trainable weights.")
    return member


def member_start(classifier: backbone.Classifier, blocks) -> str:
    """Where a member begins: the output of the layer just below the first trainable one."""
    classifier.set_trainable(blocks, log=False)
    first = trainable_layers(classifier)[0].name
    if scenarios.block_of(first) == "block5":
        return scenarios.BLOCK4_POOL
    if scenarios.block_of(first) in ("block1", "block2", "block3", "block4"):
        raise ConfigError("The whole network trains: no bag of cached-feature heads.")
    names = [l.name for l in classifier.head.layers]
    return names[names.index(first) - 1] if names.index(first) > 1 else scenarios.BLOCK5_POOL


def _file(folder: str, scenario: str) -> str:
    return os.path.join(folder, f"{scenario}.npz")


def save_members(folder: str, scenario: str, members: List[Member]) -> str:
    """Saves the fold members (``<folder>/<S>.npz``) atomically; returns the path."""
    arrays = {f"m{k}/{name}/{i}": w for k, member in enumerate(members)
              for name, weights in member.items() for i, w in enumerate(weights)}
    os.makedirs(folder, exist_ok=True)
    path = _file(folder, scenario)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, members=len(members), **arrays)
    return path


def load_members(folder: str, scenario: str) -> List[Member]:
    """The members saved by `save_members` ([] when there are none)."""
    path = _file(folder, scenario)
    if not os.path.isfile(path):
        return []
    try:
        with np.load(path) as data:
            members = [{} for _ in range(int(data["members"]))]
            for key in sorted(k for k in data.files if k != "members"):
                k, name, i = key[1:].split("/")
                members[int(k)].setdefault(name, []).append((int(i), data[key]))
    except (OSError, KeyError, ValueError) as err:
        raise ConfigError(f"Cannot read the bag's fold heads {path} ({err}); rerun "
                          "--stage=heads.") from err
    return [{name: [w for _, w in sorted(ws, key=lambda t: t[0])] for name, ws in m.items()}
            for m in members]


def build_bag(classifier: backbone.Classifier, blocks, members: List[Member],
              final_model: bool = True, name: str = "bag") -> keras.Model:
    """One Keras model averaging the members (and, with ``final_model``, the
    classifier's own weights) on the shared frozen layers below ``blocks``."""
    start = member_start(classifier, blocks)
    part = classifier.model_from(start)
    image = keras.Input(classifier.model.input.shape[1:], name="image")
    features = classifier.trunk(start)(image)
    outputs = [part(features)] if final_model else []
    for k, member in enumerate(members):
        clone = keras.models.clone_model(part)
        clone.set_weights(part.get_weights())
        for layer_name, weights in member.items():
            _layer(clone, layer_name).set_weights(weights)
        inputs = keras.Input(part.input.shape[1:], name=f"member_{k}_features")
        outputs.append(keras.Model(inputs, clone(inputs), name=f"member_{k}")(features))
    if not outputs:
        raise ConfigError("A bag needs at least one member.")
    # float32 like the members' outputs, whatever the precision policy.
    average = (outputs[0] if len(outputs) == 1 else
               keras.layers.Average(name="average", dtype="float32")(outputs))
    return keras.Model(image, average, name=name)


def _layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """A leaf layer by name, looking inside nested models."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if isinstance(layer, keras.Model):
            try:
                return _layer(layer, name)
            except KeyError:
                continue
    raise KeyError(name)


def export(bag: keras.Model, path: str) -> str:
    """Saves the bag atomically."""
    with atomic_path(path) as tmp:
        bag.save(tmp)
    return path
