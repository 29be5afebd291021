"""Small, pure tensor ops over one element dict ``{"path", "image", "label", "name"}``.

Each op is a factory returning a function of the dict, so that the eval and
train pipelines read as a chain of named steps and every op can be tested both
eagerly and inside ``tf.data.Dataset.map``.
"""

import tensorflow as tf

from small_photo_classifier.pipeline.run_info import MEANS_BGR as VGG_MEANS_BGR

# JPEG decoders can downscale by 2, 4 or 8 in the DCT domain almost for free.
# We use it only when the downscaled image is still at least the target size,
# so a huge photo never materialises at full resolution (an 8000x6000 JPEG would
# be 144 MB of uint8 and ~576 MB as float32, per parallel map call).
_JPEG_RATIOS = (1, 2, 4, 8)


def chain(*ops):
    """Composes element ops left to right: ``chain(f, g)(x) == g(f(x))``."""
    def apply(element):
        for op in ops:
            element = op(element)
        return element
    return apply


def decode_image_bytes(contents, image_size=None):
    """Decodes JPEG/PNG/GIF/BMP bytes to a uint8 RGB image of shape [H, W, 3].

    Grayscale and alpha inputs come out with exactly three channels. For JPEGs
    larger than twice ``image_size`` on the short side, decoding uses DCT
    downscaling so that memory stays bounded for very large photos.
    """
    contents = tf.convert_to_tensor(contents, tf.string)

    def generic():
        image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8,
                                   expand_animations=False)
        return image

    if image_size is None:
        return generic()

    def jpeg():
        shape = tf.image.extract_jpeg_shape(contents)
        short_side = tf.minimum(shape[0], shape[1])
        # Index of the largest ratio whose output is still >= image_size.
        fits = [short_side // r >= image_size for r in _JPEG_RATIOS]
        index = tf.reduce_sum(tf.cast(tf.stack(fits), tf.int32)) - 1
        index = tf.maximum(index, 0)
        branches = [
            (lambda r=r: tf.image.decode_jpeg(contents, channels=3, ratio=r))
            for r in _JPEG_RATIOS]
        return tf.switch_case(index, branches)

    image = tf.cond(tf.io.is_jpeg(contents), jpeg, generic)
    image.set_shape([None, None, 3])
    return image


def read():
    """Op: reads ``path`` into ``bytes``."""
    def op(element):
        return {**element, "bytes": tf.io.read_file(element["path"])}
    return op


def decode(image_size=None):
    """Op: decodes ``bytes`` into a uint8 RGB ``image`` (and drops the bytes)."""
    def op(element):
        element = dict(element)
        element["image"] = decode_image_bytes(element.pop("bytes"), image_size)
        return element
    return op


# Above this many pixels an 8-bit image is first averaged down to twice the target size
# (area resampling reads uint8 and writes only the small float32 result): the
# antialiased resize widens its whole input to float32, 1.1 GB for a 90-megapixel PNG,
# per image decoding at once. JPEGs that large are already shrunk while decoding (DCT).
LARGE_PIXELS = 16_000_000


def resize_image(image, image_size):
    """Resizes to ``image_size`` x ``image_size`` (aspect ratio not kept, as in Keras'
    ``flow_from_directory``) with antialiased bilinear filtering; float32 output in [0, 255].
    An image over `LARGE_PIXELS` is averaged to twice the size first, in its own dtype."""
    shape = tf.shape(image)
    pixels = tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64)

    def shrunk():
        return tf.image.resize(image, [2 * image_size, 2 * image_size], method="area")

    def whole():
        return tf.cast(image, tf.float32)
    image = tf.cond(pixels > LARGE_PIXELS, shrunk, whole)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear",
                            antialias=True)
    # Antialiasing kernels can overshoot slightly; keep the pixel range exact.
    return tf.clip_by_value(image, 0.0, 255.0)


def resize(image_size):
    """Op: resizes ``image`` to a square float32 image."""
    def op(element):
        return {**element, "image": resize_image(element["image"], image_size)}
    return op


def vgg_mean_centre_image(image):
    """RGB in [0, 255] -> BGR minus the ImageNet channel means; no scaling.

    Identical to ``keras.applications.vgg16.preprocess_input`` ("caffe" mode)
    up to float32 rounding. Works on [H, W, 3] and [N, H, W, 3].
    """
    image = tf.cast(image, tf.float32)
    return image[..., ::-1] - tf.constant(VGG_MEANS_BGR, tf.float32)


def vgg_mean_uncentre_image(image):
    """Inverse of `vgg_mean_centre_image`: mean-centred BGR -> RGB in [0, 255], in the
    image's own dtype (a backbone computing in bfloat16 gets bfloat16 pixels)."""
    return (image + tf.constant(VGG_MEANS_BGR, image.dtype))[..., ::-1]


def vgg_mean_centre():
    """Op: VGG mean-centring of ``image``."""
    def op(element):
        return {**element, "image": vgg_mean_centre_image(element["image"])}
    return op
