"""Data augmentation as batched TensorFlow graph ops.

All geometric changes of one image (rotation, shift, shear, zoom, flips) are
composed into a single projective transform and applied with one resampling
(``ImageProjectiveTransformV3``), instead of one resampling per effect as a stack
of Keras layers would do. Random parameters come from stateless ops driven by an
explicit seed, so a seeded run augments identically every time, and the draw is
kept separate from applying it (`sample_params` / `apply_params`).

The functions take RGB images in [0, 255]; `Augment` wraps them as a Keras layer
working on VGG mean-centred input, so augmentation can also run inside a model,
i.e. on the accelerator when there is one. The layer is the identity unless
``training=True``.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from small_photo_classifier.pipeline import ops
from small_photo_classifier.pipeline.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Preset:
    """Ranges of random augmentation. Angles in degrees; shifts as fractions of size.

    ``shear`` is in radians, as in the Keras 1 ``ImageDataGenerator`` that the
    Keras blog used (later Keras versions read the same number as degrees, which
    makes 0.2 a no-op).
    """
    rotation: float = 0.0
    width_shift: float = 0.0
    height_shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    brightness: float = 0.0   # max |delta| as a fraction of 255
    contrast: float = 0.0     # factor in [1 - c, 1 + c]
    saturation: float = 0.0   # factor in [1 - s, 1 + s]
    hue: float = 0.0          # max |delta| as a fraction of the hue circle
    # A whole number of quarter turns (0-3, uniform) before the rest: with both flips,
    # the 8 symmetries of the square, exact (no resampling, nothing filled in), for
    # photos that have no "up" (seedlings from above, microscopy, inspection).
    quarter_turns: bool = False
    # What fills pixels that come from outside the image: "nearest" (the edge pixel,
    # streaked; every earlier preset's) or "reflect" (a mirror of the image).
    fill: str = "nearest"

    @property
    def is_identity(self):
        return self == Preset()


PRESETS = {
    "none": Preset(),
    # The classic settings from the Keras blog's "building powerful image
    # classification models using very little data".
    "keras_blog": Preset(rotation=40, width_shift=0.2, height_shift=0.2, shear=0.2,
                         zoom=0.2, horizontal_flip=True),
    "aggressive": Preset(rotation=60, width_shift=0.25, height_shift=0.25, shear=0.3,
                         zoom=0.35, horizontal_flip=True, vertical_flip=True,
                         brightness=0.15, contrast=0.3, saturation=0.3, hue=0.04),
    # Photos taken from above: every orientation is a real photo of the class, so the 8
    # symmetries of the square are free; small crops, shifts and light changes, and
    # mirrored (not streaked) borders.
    "top_down": Preset(rotation=15, width_shift=0.05, height_shift=0.05, zoom=0.1,
                       horizontal_flip=True, vertical_flip=True, brightness=0.05,
                       contrast=0.1, quarter_turns=True, fill="reflect"),
}


def get_preset(name: str) -> Preset:
    """Returns the named preset, or raises ConfigError listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"--augment={name!r} is not a preset; choose one of "
                          f"{', '.join(PRESETS)}.") from None


def sample_params(batch_size, preset: Preset, seed):
    """Draws per-image random parameters for a batch. ``seed``: int32 tensor of shape [2]."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=12)

    def uniform(i, bound):
        return tf.random.stateless_uniform([batch_size], seeds[i], -bound, bound)

    def coin(i, enabled):
        if not enabled:
            return tf.ones([batch_size])
        draw = tf.random.stateless_uniform([batch_size], seeds[i])
        return tf.where(draw < 0.5, -1.0, 1.0)

    angle = uniform(0, math.radians(preset.rotation))
    if preset.quarter_turns:
        # Drawn from a seed folded out of the batch's, so the 12 draws above (and every
        # earlier preset's cached views) are unchanged.
        turns = tf.random.stateless_uniform([batch_size], tf.random.experimental.
                                            stateless_fold_in(tf.cast(seed, tf.int64), 12),
                                            0, 4, dtype=tf.int32)
        angle = angle + tf.cast(turns, tf.float32) * (math.pi / 2)
    return {
        "angle": angle,
        "tx": uniform(1, preset.width_shift),
        "ty": uniform(2, preset.height_shift),
        "shear": uniform(3, preset.shear),
        "zx": 1.0 + uniform(4, preset.zoom),
        "zy": 1.0 + uniform(5, preset.zoom),
        "fx": coin(6, preset.horizontal_flip),
        "fy": coin(7, preset.vertical_flip),
        "brightness": uniform(8, preset.brightness * 255.0),
        "contrast": 1.0 + uniform(9, preset.contrast),
        "saturation": 1.0 + uniform(10, preset.saturation),
        "hue": uniform(11, preset.hue),
    }


def _matrices(params, height, width):
    """Forward 3x3 transforms (output = M @ input, pixel coordinates) per image."""
    n = tf.shape(params["angle"])[0]
    zeros, ones = tf.zeros([n]), tf.ones([n])
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)

    def mat(rows):
        return tf.reshape(tf.stack([v for row in rows for v in row], axis=-1), [n, 3, 3])

    cx, cy = (w - 1) / 2, (h - 1) / 2
    to_centre = mat([[ones, zeros, -cx * ones], [zeros, ones, -cy * ones], [zeros, zeros, ones]])
    from_centre = mat([[ones, zeros, cx * ones], [zeros, ones, cy * ones], [zeros, zeros, ones]])
    cos, sin = tf.cos(params["angle"]), tf.sin(params["angle"])
    rotate = mat([[cos, -sin, zeros], [sin, cos, zeros], [zeros, zeros, ones]])
    shear = mat([[ones, -tf.sin(params["shear"]), zeros],
                 [zeros, tf.cos(params["shear"]), zeros], [zeros, zeros, ones]])
    scale = mat([[params["zx"] * params["fx"], zeros, zeros],
                 [zeros, params["zy"] * params["fy"], zeros], [zeros, zeros, ones]])
    shift = mat([[ones, zeros, params["tx"] * w], [zeros, ones, params["ty"] * h],
                 [zeros, zeros, ones]])
    return from_centre @ shift @ rotate @ shear @ scale @ to_centre


def projective_transforms(params, height, width):
    """The 8 numbers per image that ``ImageProjectiveTransformV3`` takes for drawn
    ``params`` (an optional ``"transforms"`` entry of them lets `apply_params` skip this)."""
    # ImageProjectiveTransform maps *output* to *input* coordinates: invert.
    inverse = tf.linalg.inv(_matrices(params, height, width))
    inverse = inverse / inverse[:, 2:3, 2:3]
    return tf.reshape(inverse, [-1, 9])[:, :8]


def apply_params(images, params, preset: Preset):
    """Applies drawn parameters to RGB images in [0, 255], shape [N, H, W, 3]."""
    images = tf.convert_to_tensor(images, tf.float32)
    if preset.is_identity:
        return images
    shape = tf.shape(images)
    geometric = (preset.rotation or preset.width_shift or preset.height_shift or preset.shear
                 or preset.zoom or preset.horizontal_flip or preset.vertical_flip
                 or preset.quarter_turns)
    if geometric:
        transforms = params.get("transforms")
        if transforms is None:
            transforms = projective_transforms(params, shape[1], shape[2])
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=shape[1:3],
            fill_value=0.0, interpolation="BILINEAR", fill_mode=preset.fill.upper())
    if preset.brightness:
        images = images + params["brightness"][:, None, None, None]
    if preset.contrast:
        mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
        images = (images - mean) * params["contrast"][:, None, None, None] + mean
    if preset.saturation or preset.hue:
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(images, 0.0, 255.0) / 255.0)
        hue = tf.math.floormod(hsv[..., 0] + params["hue"][:, None, None], 1.0)
        sat = tf.clip_by_value(hsv[..., 1] * params["saturation"][:, None, None], 0.0, 1.0)
        images = tf.image.hsv_to_rgb(tf.stack([hue, sat, hsv[..., 2]], axis=-1)) * 255.0
    return tf.clip_by_value(images, 0.0, 255.0)


def augment_batch(images, preset: Preset, seed):
    """Randomly augments a batch of RGB images in [0, 255]; shape and dtype are kept."""
    if preset.is_identity:
        return tf.convert_to_tensor(images, tf.float32)
    params = sample_params(tf.shape(images)[0], preset, seed)
    return apply_params(images, params, preset)


# The serialisation key keeps the project's first name: model.keras files saved by
# every earlier version name their layers by it, and load unchanged.
@keras.saving.register_keras_serializable(package="invasive_vgg")
class Augment(keras.layers.Layer):
    """Keras layer applying a preset to VGG mean-centred batches when ``training=True``.

    Used to run augmentation inside the training model (on the accelerator when
    present). It is never part of an exported model.
    """

    def __init__(self, preset_name="keras_blog", seed=0, **kwargs):
        super().__init__(**kwargs)
        self.preset_name = preset_name
        self.preset = get_preset(preset_name)
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.preset.is_identity:
            return inputs
        seed = keras.random.randint((2,), 0, 2**31 - 1, seed=self._seed_generator)
        rgb = ops.vgg_mean_uncentre_image(inputs)
        return ops.vgg_mean_centre_image(augment_batch(rgb, self.preset, seed))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "preset_name": self.preset_name, "seed": self.seed}
