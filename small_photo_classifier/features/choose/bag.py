"""The bag: the chosen scenario's K cross-validation fold heads plus the final model.

A member is the trainable layers of one fold's head at the chosen epoch, as
cross-validation left them (`features.choose.cv`): nothing is trained twice. In the bag
the frozen layers below the first trainable one (the *start*) run once and are
shared; each member is a copy of the part from there up, and an ``Average`` layer
(float32) combines them with the final model.

A `members_model` holds only the K fold members (start features -> K outputs);
the heads stage saves it (``heads/bag/<S>.keras``) and the export gives that file
a second name, ``bag.keras`` (a hard link, `pipeline.atomic.atomic_link`). The
frozen trunk and the final model are ``model.keras``'s, so `load` joins the two
files instead of the bag repeating the base network's weights (the VGG16 conv
base alone is 59 MB). Only plain layers: both load with ``safe_mode=True``.
"""

import os
from typing import Dict, List, Optional

import keras
import numpy as np

from small_photo_classifier.features import backbone, precision
from small_photo_classifier.pipeline.atomic import atomic_path
from small_photo_classifier.pipeline.errors import ConfigError

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
    stage, net = classifier.block_of(first), classifier.net
    if stage == net.stages[-1]:
        return net.stem_layer
    if stage in net.stages:
        raise ConfigError("The whole network trains: no bag of cached-feature heads.")
    names = [l.name for l in classifier.head.layers]
    return names[names.index(first) - 1] if names.index(first) > 1 else net.feature_layer


def members_file(folder: str, scenario: str) -> str:
    """Where the heads stage keeps scenario ``scenario``'s fold members."""
    return os.path.join(folder, f"{scenario}.keras")


def load_members(path: str) -> Optional[keras.Model]:
    """The `members_model` saved at ``path`` (None when there is none)."""
    if not os.path.isfile(path):
        return None
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot read the bag's fold heads {path} ({err}); rerun "
                          "--stage=heads.") from err


def size(members: keras.Model) -> int:
    """How many fold members a `members_model` holds."""
    return len(members.outputs)


def members_model(classifier: backbone.Classifier, blocks,
                  members: List[Member]) -> keras.Model:
    """The fold members alone, what ``bag.keras`` stores: the features at the start
    layer (`member_start`) -> one output per member."""
    if not members:
        raise ConfigError("A bag needs at least one fold member.")
    start = member_start(classifier, blocks)
    part = classifier.model_from(start)
    features = keras.Input(part.input.shape[1:], name=f"{start}_features")
    outputs = []
    for k, member in enumerate(members):
        clone = keras.models.clone_model(part)
        clone.set_weights(part.get_weights())
        for layer_name, weights in member.items():
            _layer(clone, layer_name).set_weights(weights)
        inputs = keras.Input(part.input.shape[1:], name=f"member_{k}_features")
        outputs.append(keras.Model(inputs, clone(inputs), name=f"member_{k}")(features))
    return keras.Model(features, outputs, name="bag_members")


def assemble(classifier: backbone.Classifier, start: str, members: keras.Model,
             name: str = "bag") -> keras.Model:
    """The bag as one image -> probabilities model: the classifier's frozen trunk up to
    ``start``, then the average of the classifier's own part from there and every
    output of ``members`` (a `members_model`)."""
    trunk = classifier.trunk(start)
    if tuple(members.input.shape[1:]) != tuple(trunk.output.shape[1:]):
        raise ConfigError(f"The bag's fold heads take features of shape "
                          f"{tuple(members.input.shape[1:])}, but the model's {start} gives "
                          f"{tuple(trunk.output.shape[1:])}: they are from another run; "
                          "rerun --stage=heads.")
    image = keras.Input(classifier.model.input.shape[1:], name="image")
    return keras.Model(image, on_features(classifier, start, members)(trunk(image)), name=name)


def on_features(classifier: backbone.Classifier, start: str, members: keras.Model) -> keras.Model:
    """The bag above its frozen trunk: features at ``start`` -> the average of the
    classifier's own part from there and every output of ``members``."""
    part = classifier.model_from(start)
    features = keras.Input(part.input.shape[1:], name=f"{start}_features")
    outputs = members(features)
    outputs = [part(features)] + (list(outputs) if isinstance(outputs, (list, tuple))
                                  else [outputs])
    # float32 like the members' outputs, whatever the precision policy.
    average = keras.layers.Average(name="average", dtype="float32")(outputs)
    return keras.Model(features, average, name="bag_above_trunk")


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


def save(members: keras.Model, path: str) -> str:
    """Saves a `members_model` atomically."""
    with atomic_path(path) as tmp:
        members.save(tmp)
        precision.store_float32(tmp)
    return path


def load(model: keras.Model, path: str, start: str) -> keras.Model:
    """The bag of an exported run: ``model`` (its ``model.keras``) joined with the fold
    members saved at ``path`` (its ``bag.keras``), which begin at the layer ``start``.

    A ``bag.keras`` written before the members were stored alone is a whole network
    (its input is an image): it is returned as it is.
    """
    members = load_members(path)
    if members is None:
        raise ConfigError(f"No bag at {path}.")
    if tuple(members.input.shape[1:]) == tuple(model.input.shape[1:]):
        return members
    return assemble(backbone.from_model(model), start, members)
