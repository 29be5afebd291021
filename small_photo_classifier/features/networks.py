"""One description per backbone: what every module reads instead of naming layers.

A `Backbone` says which network it is (name, identity for provenance), how it is
built (a `keras.applications` constructor or a ``.keras`` file), what input it
wants (`preprocessing`), its stages in order, and the two layers the feature
cache holds:

    image --[stem: every stage but the last]--> stem_layer    (cached; C starts here)
          --[last stage]-----------------------> feature_layer (cached; probe, A, B)
          --[head: pool, fc1, dropout, predictions]--> probabilities

VGG16 is the reference: its description is a constant (`VGG16`) and reproduces the
names every earlier run used (``block4_pool``, ``block5_pool``, ``fc2``). Any other
network is described from its built layers by `describe`: the last layer with a
spatial (4-D) output is the feature map, and the stages come from Keras' naming
conventions (``blockN…`` in VGG and EfficientNet, ``convN_…`` in ResNet,
``stage_N``/``stageN`` in ConvNeXt and RegNet), else from where the spatial
resolution halves (MobileNet). Flags override both (`BackboneChoice`).

Only the parts that need no TensorFlow live here, so flags can be checked first.
"""

import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from small_photo_classifier.pipeline import run_info
from small_photo_classifier.pipeline.errors import ConfigError

FC, PREDICTIONS, FC2 = "fc", "predictions", "fc2"
INPUT = "input"
# The smallest input size: five halvings (every backbone here downsamples by 32) leave
# one pixel.
MIN_IMAGE_SIZE = 32
# A stage alias every backbone understands: its last stage (scenario C trains it).
LAST_STAGE = "last"
# Input contracts. Every input graph in this tool produces VGG's "caffe" input
# (RGB -> BGR minus the ImageNet means, no scaling): it is linear, so augmentation,
# TTA and the cache treat every backbone alike. A network that wants RGB in
# [0, 255] (and preprocesses inside itself, as Keras' EfficientNetV2, ConvNeXt,
# MobileNetV3 and the user's own files do) gets an exact inverse as its first layer.
# A ``.keras`` file that does not preprocess inside itself names what it expects
# (``PATH:minus_one_to_one``): the first layers then scale the RGB pixels to it, with
# Keras' own Rescaling and Normalization (safe_mode loads them).
CAFFE, RGB255 = "caffe", "rgb255"
MINUS_ONE_TO_ONE, ZERO_TO_ONE, IMAGENET_MEAN_STD = (
    "minus_one_to_one", "zero_to_one", "imagenet_mean_std")
PREPROCESSING_TEXT = {
    CAFFE: f"{run_info.INPUT_VALUES}; the network expects exactly this",
    RGB255: "the input graph's BGR mean-centring undone in the network's first layer "
            "(RGB in [0, 255]); the network's own preprocessing follows inside it",
    MINUS_ONE_TO_ONE: "the input graph's BGR mean-centring undone, then RGB scaled to "
                      "[-1, 1] (x / 127.5 - 1) in the network's first layers",
    ZERO_TO_ONE: "the input graph's BGR mean-centring undone, then RGB scaled to [0, 1] "
                 "(x / 255) in the network's first layers",
    IMAGENET_MEAN_STD: "the input graph's BGR mean-centring undone, then RGB scaled to "
                       "[0, 1] and standardised by ImageNet's mean and std (0.485, 0.456, "
                       "0.406; 0.229, 0.224, 0.225) in the network's first layers",
}
# What each contract means to a user, for --help and errors.
CONTRACTS = {
    RGB255: "RGB 0..255 (the file scales its input itself)",
    MINUS_ONE_TO_ONE: "RGB in [-1, 1]",
    ZERO_TO_ONE: "RGB in [0, 1]",
    IMAGENET_MEAN_STD: "RGB in [0, 1] minus ImageNet's mean, over its std",
    CAFFE: "BGR minus ImageNet's mean pixel, unscaled (VGG and Caffe style)",
}


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What every module needs to know about a backbone network.

    Attributes:
      name: ``vgg16``, a `keras.applications` name (`NAMED`), or a ``.keras`` path.
      source: where it comes from, for provenance ("keras.applications.VGG16", "file:…").
      stages: stage names in network order (``block1``..``block5`` for VGG16).
      stem_layer: the layer whose output enters the last stage (cached; scenario C).
      feature_layer: the last spatial feature map (cached; probe, scenarios A and B).
      preprocessing: `CAFFE` or `RGB255` (see the module docstring).
      pooling: how the head reduces the feature map: "flatten" (VGG16's head, as in
        the reference write-up) or "avg" (global average pooling, the usual head of
        a modern network: its feature maps are wide, 1280 channels for Lite0).
      default_image_size: the size it was trained at.
      min_image_size: the smallest input that survives its downsampling.
      imagenet_top: whether ``--include_top`` can keep its ImageNet dense layers.
      near_duplicate: the cosine similarity of average-pooled features at or above which
        two photos are near-duplicates, where it was measured (VGG16: 0.95,
        docs/benchmarks.md); None: calibrated on each run's photos
        (`workflow.train.labelling.near_duplicate_threshold`), since the scale of
        similarities is the network's own (Lite0: a JPEG re-save of a photo scores
        0.85-0.91 with it, where VGG16 scores 0.98).
      own_loader: built by its own loader (`features.weights`: Keras' ImageNet file, a
        weights file of either format, or seeded random weights), not by
        `features.zoo` (VGG16, whose cache files and scores every earlier run made).
      xla_convs: whether its training conv blocks run XLA-compiled on a float32 CPU
        (`features.backbone.CompiledConvs`). Measured per network: VGG16's plain 3x3
        convolutions train 2x faster (block5, 128 -> 64 ms per image); EfficientNet-
        Lite0's depthwise block7 7x slower (0.65 -> 4.5 s per epoch of 195 images).
    """
    name: str
    source: str
    stages: Tuple[str, ...]
    stem_layer: str
    feature_layer: str
    preprocessing: str = CAFFE
    pooling: str = "avg"
    default_image_size: int = 224
    min_image_size: int = MIN_IMAGE_SIZE
    imagenet_top: bool = False
    near_duplicate: Optional[float] = None
    xla_convs: bool = False
    own_loader: bool = False

    @property
    def slug(self) -> str:
        """A short file-name-safe name: ``vgg16``, ``resnet50``, ``efficientnet_lite0``."""
        base = os.path.splitext(os.path.basename(self.name))[0]
        return re.sub(r"[^A-Za-z0-9_]+", "_", base).strip("_") or "backbone"

    @property
    def blocks(self) -> Tuple[str, ...]:
        """What ``--trainable_blocks`` may name: the stages, ``fc`` and ``predictions``."""
        return self.stages + (FC, PREDICTIONS)

    def resolve_blocks(self, blocks: Sequence[str], flag: str = "--trainable_blocks"
                       ) -> List[str]:
        """Stage names as this backbone spells them (`LAST_STAGE` -> its last stage),
        checked and in network order."""
        names = [self.stages[-1] if b == LAST_STAGE else b for b in blocks]
        unknown = [n for n in names if n not in self.blocks]
        if unknown:
            raise ConfigError(f"{flag}: {', '.join(map(repr, unknown))} matches no block of "
                              f"{self.slug}; choose from {', '.join(self.blocks)} (or "
                              f"{LAST_STAGE!r}, its last stage).")
        return sorted(set(names), key=self.blocks.index)

    def start_layer(self, blocks: Sequence[str], include_top: bool) -> str:
        """The highest cached layer below every trainable block (`INPUT` if none is).

        Scenario A (output layer only) starts from ``fc2`` when VGG16's ImageNet top
        is kept, else from `feature_layer`; B from `feature_layer`; C (the last
        stage) from `stem_layer`; earlier stages from the image.
        """
        blocks = set(self.resolve_blocks(blocks))
        if blocks & set(self.stages[:-1]):
            return INPUT
        if self.stages[-1] in blocks:
            return self.stem_layer
        if FC in blocks or not include_top:
            return self.feature_layer
        return FC2

    def cacheable(self, include_top: bool) -> Tuple[str, ...]:
        """The layers a feature cache can hold, in network order."""
        return (self.stem_layer, self.feature_layer) + ((FC2,) if include_top else ())

    def describe_input(self) -> str:
        """One line for logs and model_info.json."""
        return PREPROCESSING_TEXT[self.preprocessing]


VGG16 = Backbone(name="vgg16", source="keras.applications.VGG16",
                 stages=("block1", "block2", "block3", "block4", "block5"),
                 stem_layer="block4_pool", feature_layer="block5_pool", preprocessing=CAFFE,
                 pooling="flatten", default_image_size=224, min_image_size=32,
                 imagenet_top=True, near_duplicate=0.95, xla_convs=True, own_loader=True)

# keras.applications networks by --backbone name: (constructor, preprocessing). Each
# is described from its layers once built (`describe`), as a file would be.
NAMED: Dict[str, Tuple[str, str]] = {
    "resnet50": ("ResNet50", CAFFE),
    "efficientnetb0": ("EfficientNetB0", RGB255),
    "efficientnetv2b0": ("EfficientNetV2B0", RGB255),
    "efficientnetv2s": ("EfficientNetV2S", RGB255),
    "convnext_tiny": ("ConvNeXtTiny", RGB255),
    "mobilenetv3large": ("MobileNetV3Large", RGB255),
    "mobilenetv3small": ("MobileNetV3Small", RGB255),
}


# The input size each keras.applications network was trained at (its Keras docs and
# weights file): its default input size here, as timm's ``pretrained_cfg`` and
# keras-hub's presets fix one per model.
TRAINED_SIZE: Dict[str, int] = {VGG16.name: VGG16.default_image_size, "resnet50": 224, "efficientnetb0": 224,
                                "efficientnetv2b0": 224, "efficientnetv2s": 384,
                                "convnext_tiny": 224, "mobilenetv3large": 224,
                                "mobilenetv3small": 224}
# A file that says nothing about its size: the usual ImageNet size (logged as a guess).
GUESSED_SIZE = 224


@dataclasses.dataclass(frozen=True)
class BackboneChoice:
    """What the user asked for: ``--backbone`` plus the overrides for a file.

    Attributes:
      name: ``vgg16``, a `NAMED` network, or the path of a ``.keras`` model file.
      feature_layer: ``--feature_layer``: use this layer as the feature map.
      stage_ends: ``--stage_ends``: the last layer of each stage, in order.
      size: the input size named with it (``NAME@SIZE``, ``PATH@SIZE``), else None.
      contract: a file's input contract (``PATH:CONTRACT``, ``PATH@SIZE:CONTRACT``, or
        `RGB255` when the file's first layer scales its input itself), else None.
    """
    name: str
    feature_layer: Optional[str] = None
    stage_ends: Tuple[str, ...] = ()
    size: Optional[int] = None
    contract: Optional[str] = None  # a file's input (`CONTRACTS`); None: a named network
    contract_named: bool = False  # the user named it (else the file's first layer says)

    @property
    def is_file(self) -> bool:
        """A user's ``.keras`` model file rather than a network by name."""
        return self.name not in NAMED and self.name != "vgg16"

    @property
    def keeps_imagenet_top(self) -> bool:
        """Whether ``--include_top`` can keep its ImageNet dense layers (VGG16's fc1/fc2;
        every other backbone gets a new head)."""
        described = self.described()
        return described is not None and described.imagenet_top

    def described(self) -> Optional["Backbone"]:
        """Its description when known without building it (VGG16, the reference), else
        None (built and described by `features.zoo`)."""
        return VGG16 if self.name == VGG16.name else None

    @property
    def label(self) -> str:
        """How the user names it: ``NAME`` or ``NAME@SIZE``."""
        return self.name + (f"@{self.size}" if self.size else "") + (
            f":{self.contract}" if self.contract and self.contract_named else "")

    def trained_size(self) -> Tuple[int, str]:
        """(its default input size, why): ``@SIZE`` when named so, else the size it was
        trained at: a named network's (`TRAINED_SIZE`), a file's fixed input shape;
        a file whose input takes any size says nothing, and gets `GUESSED_SIZE`."""
        if self.size:
            return self.size, f"named as {os.path.basename(self.name)}@{self.size}"
        if not self.is_file:
            return TRAINED_SIZE[self.name], (f"{self.name} was trained at "
                                             f"{TRAINED_SIZE[self.name]} px")
        fixed = file_input_size(self.name)
        if fixed:
            return fixed, f"the file's input is fixed at {fixed} x {fixed} px"
        return GUESSED_SIZE, (f"the file's input takes any size and it does not say which "
                              f"it was trained at: {GUESSED_SIZE} px, the usual ImageNet "
                              f"size; name it as --backbone={os.path.basename(self.name)}"
                              f"@SIZE (e.g. @260 for EfficientNet-Lite2)")


def _file_layers(path: str) -> list:
    """The layer configs of a ``.keras`` file's model, read from its zip without
    TensorFlow ([] when the file cannot be read so)."""
    import json
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    return (config.get("config") or {}).get("layers") or []


def file_input_size(path: str) -> Optional[int]:
    """The square input size fixed in a ``.keras`` file's model config (its first input
    layer's ``batch_shape``), read from the zip without TensorFlow; None when any size is
    accepted or the file does not say."""
    layers = _file_layers(path)
    for layer in layers:
        if layer.get("class_name") == "InputLayer":
            shape = (layer.get("config") or {}).get("batch_shape") or []
            if len(shape) == 4 and shape[1] and shape[1] == shape[2]:
                return int(shape[1])
            return None
    return None


def file_contract(path: str) -> Optional[str]:
    """`RGB255` when a ``.keras`` file's first layer after its input rescales or
    normalises (it takes RGB 0..255 and scales it itself, as Keras' applications and the
    shared EfficientNet-Lite files do), else None: the file does not say what it wants.
    Read from the zip without TensorFlow."""
    layers = _file_layers(path)
    if not layers:
        return None
    inputs = [layer for layer in layers if layer.get("class_name") == "InputLayer"]
    shape = ((inputs[0].get("config") or {}).get("batch_shape") or []) if inputs else []
    if len(shape) != 4 or shape[-1] != 3:
        return RGB255  # not an image network: loading it says so (`zoo.load_file`)
    rest = [layer.get("class_name") for layer in layers if layer not in inputs]
    return RGB255 if rest and rest[0] in ("Rescaling", "Normalization") else None


def split_contract(text: str) -> Tuple[str, Optional[str]]:
    """``PATH:CONTRACT`` (a `CONTRACTS` name after the last colon) -> (PATH, CONTRACT);
    anything else -> (text, None)."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.strip().lower() in CONTRACTS:
        return head, tail.strip().lower()
    return text, None


def split_size(text: str) -> Tuple[str, Optional[int]]:
    """``NAME@SIZE`` -> (NAME, SIZE); anything else -> (text, None)."""
    head, sep, tail = text.rpartition("@")
    if sep and tail.strip().isdigit():
        return head.strip(), int(tail)
    return text, None


def check_choice(name: str, feature_layer: Optional[str] = None,
                 stage_ends: Sequence[str] = ()) -> BackboneChoice:
    """``--backbone`` (or a ``--backbones`` entry: ``NAME`` or ``NAME@SIZE``, ``PATH`` or
    ``PATH@SIZE``) and its overrides, checked without TensorFlow."""
    text, contract = split_contract(str(name).strip())
    text, size = split_size(text)
    normal = text.lower().replace("-", "_")
    if size is not None and size < 32:
        raise ConfigError(f"--backbone={name!r}: a size of {size} px is below the smallest "
                          "any backbone here takes (32 px: five halvings).")
    if normal in NAMED or normal == "vgg16":
        if (feature_layer or stage_ends) and normal == "vgg16":
            raise ConfigError("--feature_layer/--stage_ends describe another network's "
                              "layers; VGG16's are fixed (block4_pool, block5_pool).")
        if contract:
            raise ConfigError(f"--backbone={name!r}: {normal} brings its own input "
                              f"preprocessing; a contract (:{contract}) is for .keras files.")
        return BackboneChoice(normal, feature_layer or None, tuple(stage_ends), size)
    if not text.endswith(".keras"):
        raise ConfigError(f"--backbone={text!r}: expected vgg16, one of "
                          f"{', '.join(sorted(NAMED))}, or the path of a Keras model file "
                          "(.keras), each optionally with @SIZE (e.g. model.keras@260).")
    if not os.path.isfile(text):
        raise ConfigError(f"--backbone={text!r}: no such file (expected a Keras .keras model "
                          "file of an image network).")
    recorded = file_contract(text)
    if contract is None and recorded is None:
        raise ConfigError(
            f"--backbone={name}: the file does not say what input it expects (its first "
            "layer neither rescales nor normalises), and a wrong guess gives wrong features "
            "with no error. Name it after the path, e.g. --backbone="
            f"{os.path.basename(text)}{'@' + str(size) if size else ''}:minus_one_to_one; "
            "the choices: " + "; ".join(f"{k} = {v}" for k, v in CONTRACTS.items()) + ".")
    return BackboneChoice(os.path.abspath(text), feature_layer or None, tuple(stage_ends),
                          size, contract or recorded, contract_named=contract is not None)


def candidates(entries: Sequence[str]) -> Tuple[Tuple[BackboneChoice, ...],
                                               Tuple[Tuple[str, str], ...]]:
    """``--backbones`` entries checked: (the candidates, each distinct once; (entry, why)
    of each entry that names no backbone: a missing file, an unknown name). A failing
    entry gets a row of the comparison that says why, and the rest go on."""
    if len(entries) < 2:
        raise ConfigError(f"--backbones={','.join(entries)}: name at least two backbones to "
                          "compare (--backbone=auto and --stage=backbones choose among them).")
    choices, failures = [], []
    for entry in entries:
        try:
            choices.append(check_choice(entry))
        except ConfigError as err:
            failures.append((entry, " ".join(str(err).split())))
    if not choices:
        raise ConfigError("No entry of --backbones names a backbone:\n" + "\n".join(
            f"  {entry}: {why}" for entry, why in failures))
    return tuple(dict.fromkeys(choices)), tuple(failures)


_STAGE_PATTERNS = (
    ("blockN", re.compile(r"^block(\d+)"), "block{}"),
    ("convN_", re.compile(r"^conv(\d+)_"), "conv{}"),
    ("stageN", re.compile(r"stage_?(\d+)", re.IGNORECASE), "stage{}"),
)


def stages_by_name(layer_names: Sequence[str],
                   inbound: Optional[Dict[str, set]] = None) -> Optional[Dict[str, str]]:
    """Layer name -> stage by the naming convention that covers the most layers
    (at least two stages), or None. A layer without a stage in its name joins the
    stage of its inputs when they share one (a residual ``add`` its block's; a final
    1x1 conv the last stage), else the stage it feeds (the stem the first stage).
    ``inbound``: layer name -> the names of the layers feeding it."""
    best = None
    for _, pattern, fmt in _STAGE_PATTERNS:
        named = {n: fmt.format(int(m.group(1))) for n in layer_names
                 if (m := pattern.search(n))}
        if len(set(named.values())) >= 2 and (best is None or len(named) > len(best)):
            best = named
    if best is None:
        return None
    out, pending = {}, []
    for n in layer_names:
        sources = {out.get(i) for i in (inbound or {}).get(n, ())}
        stage = best.get(n) or (sources.pop() if len(sources) == 1 and None not in sources
                                else None)
        if stage:
            out.update({p: stage for p in pending})
            pending = []
            out[n] = stage
        else:
            pending.append(n)
    last = next(reversed(out.values()))
    out.update({p: last for p in pending})
    return out


def stages_by_ends(layer_names: Sequence[str], ends: Sequence[str]) -> Dict[str, str]:
    """Layer name -> ``stage1``.. from the last layer of each stage (``--stage_ends``);
    layers after the last end join the last stage."""
    missing = [e for e in ends if e not in layer_names]
    if missing:
        raise ConfigError(f"--stage_ends: no layer named {', '.join(map(repr, missing))} in "
                          "the network.")
    positions = [layer_names.index(e) for e in ends]
    if positions != sorted(positions) or len(ends) < 2:
        raise ConfigError("--stage_ends: name at least two layers, in network order "
                          f"(got {', '.join(ends)}).")
    out, stage = {}, 0
    for i, n in enumerate(layer_names):
        out[n] = f"stage{min(stage, len(ends) - 1) + 1}"
        if stage < len(ends) and i == positions[stage]:
            stage += 1
    return out


def stages_by_resolution(layers: Sequence[Tuple[str, Optional[int]]]) -> Dict[str, str]:
    """Layer name -> ``stage1``..: a new stage wherever the main path's spatial size (the
    height of a 4-D output) shrinks. Side branches that pool to less than what follows
    (squeeze-and-excitation's 1x1 maps) are not the main path; layers without a
    spatial output stay in the current stage."""
    heights = [h for _, h in layers]
    later = [max([h for h in heights[i + 1:] if h is not None], default=0)
             for i in range(len(heights))]
    out, stage, size = {}, 0, None
    for (name, height), after in zip(layers, later):
        main = height is not None and height >= after
        if main and size is not None and height < size:
            stage += 1
        if main:
            size = height
        out[name] = f"stage{stage + 1}"
    return out
