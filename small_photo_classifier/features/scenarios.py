"""The scenario table, the trainable blocks and the head's layer names: pure Python.

Every module reads layer names and scenarios from here, and the scripts can
check ``--scenarios``/``--trainable_blocks`` before TensorFlow is imported.
"""

import dataclasses
from typing import List, Optional, Sequence

from small_photo_classifier.features import networks
from small_photo_classifier.pipeline.errors import ConfigError

# Layer and sub-model names of VGG16 and of the head. Other backbones' layers come
# from their description (`features.networks.Backbone`), which every module reads.
INPUT = networks.INPUT
BLOCK4_POOL = networks.VGG16.stem_layer
BLOCK5_POOL = networks.VGG16.feature_layer
GAP = "avg_pool"
FLATTEN = "flatten"
FC1 = "fc1"
FC2 = "fc2"
DROPOUT = "dropout"
PREDICTIONS = "predictions"
STEM, BLOCK5, HEAD = "vgg16_stem", "vgg16_block5", "head"
# Layers whose outputs the feature cache can hold, in network order.
BLOCKS = networks.VGG16.blocks
# Without the ImageNet top, the head gets one new hidden layer of this width.
NO_TOP_HIDDEN_UNITS = 256


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One row of the scenario table: what trains, where it starts, how fast it learns.

    Attributes:
      name: "A", "B" or "C".
      blocks: the blocks that train (names from `BLOCKS`).
      learning_rate: default heads-stage learning rate of a flattening head (VGG16's).
        Measured on real photos with ImageNet-derived weights (docs/benchmarks.md): the
        output layer alone (A) wants 1e-3, as in the reference write-up; training the
        dense layers (B) or block5 (C) from the cache at 1e-3 overfits within an epoch
        or two (C collapsed to AUC 0.65), so they get the reference's 1e-4.
      description: one line for --help and logs.
      pooled_learning_rate: the same for a head that pools the feature map (every
        other backbone): its fc1 sees 1280 numbers, not VGG16's 25,088, and at 1e-4 it
        was still improving after 100 epochs on the shared seedlings; at 1e-3 B and C
        were better (CV 0.707 / 0.759 against 0.650 / -) in a third of the epochs.
    """
    name: str
    blocks: tuple
    learning_rate: float
    description: str
    pooled_learning_rate: float = 1e-3

    def rate(self, pooling: str) -> float:
        """The default learning rate for a head that ``pooling``s the feature map."""
        return self.learning_rate if pooling == "flatten" else self.pooled_learning_rate

    def start_layer(self, include_top: bool, net: networks.Backbone) -> str:
        """The cached layer this scenario trains from on ``net`` (see `start_layer`)."""
        return start_layer(self.blocks, include_top, net)

    def blocks_on(self, net: networks.Backbone) -> List[str]:
        """The blocks that train, in ``net``'s stage names (C: its last stage)."""
        return net.resolve_blocks(self.blocks)

    def part(self, classifier):
        """The sub-model of a `features.backbone.Classifier` this scenario trains:
        everything above its cached start layer."""
        return classifier.model_from(classifier.start_layer(self.blocks))


SCENARIOS = {
    "A": Scenario("A", (PREDICTIONS,), 1e-3, "only the new output layer"),
    "B": Scenario("B", ("fc", PREDICTIONS), 1e-4, "all dense layers"),
    "C": Scenario("C", (networks.LAST_STAGE, "fc", PREDICTIONS), 1e-4,
                  "dense layers plus the backbone's last stage (VGG16's block5, "
                  "EfficientNet's block7)"),
}
SCENARIO_HELP = "; ".join(f"{s.name} = {s.description}" for s in SCENARIOS.values())


def get_scenario(scenario: str) -> Scenario:
    """The scenario table's row for a name such as "b" or " C "."""
    try:
        return SCENARIOS[scenario.strip().upper()]
    except KeyError:
        raise ConfigError(f"Unknown scenario {scenario!r}; choose from "
                          f"{', '.join(SCENARIOS)} ({SCENARIO_HELP}).") from None


def block_of(layer_name: str) -> Optional[str]:
    """The trainable block a VGG16 layer belongs to (``block1``..``block5``, ``fc``,
    ``predictions``); other backbones map their layers when built
    (`features.backbone.Classifier.block_of`)."""
    prefix = layer_name.split("_")[0]
    if prefix in BLOCKS[:5]:
        return prefix
    if layer_name in (FC1, FC2):
        return "fc"
    if layer_name == PREDICTIONS:
        return PREDICTIONS
    return None


def parse_blocks(spec: str, net: networks.Backbone) -> List[str]:
    """Parses ``--trainable_blocks`` such as "block4,block5,fc" (``predictions`` is
    implied) into ``net``'s stage names (``last`` = its last stage)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--trainable_blocks={spec!r}: nothing given; choose from "
                          f"{', '.join(net.blocks)}.")
    return net.resolve_blocks(names + [PREDICTIONS], f"--trainable_blocks={spec!r}")


def start_layer(blocks: Sequence[str], include_top: bool, net: networks.Backbone) -> str:
    """The highest cacheable layer below every trainable block (`INPUT` if none is);
    see `features.networks.Backbone.start_layer`. For VGG16: scenario A starts from
    ``fc2`` when the ImageNet top is kept, else from ``block5_pool``; B from
    ``block5_pool``; C from ``block4_pool``."""
    return net.start_layer(blocks, include_top)


# The optimizers a head or fine-tuning can use (`features.backbone.make_optimizer`).
OPTIMIZERS = ("adam", "sgd", "rmsprop")


def check_optimizer(name: str) -> str:
    """``name`` normalised (``" Adam"`` -> ``"adam"``), or a ConfigError listing the
    optimizers: the one check every flag and builder goes through."""
    normal = str(name).strip().lower()
    if normal not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}.")
    return normal
