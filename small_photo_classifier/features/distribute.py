"""All local devices of one host with tf.distribute.MirroredStrategy.

One replica of the model per device; each batch is split between them and the
gradients are summed, so training is data-parallel. The global batch is
``--batch_size`` whatever the number of replicas (each replica gets
``batch_size / replicas``): results then do not depend on how many devices ran
them (equal up to float rounding and dropout masks, which each replica draws
itself), and a user with more devices raises ``--batch_size`` deliberately.

``--cpu_replicas=N`` splits the CPU into N logical devices, so the mirrored
path runs (and is tested) on machines without GPUs; it makes nothing faster.

What runs where:
  * Keras ``fit``/``evaluate`` (the heads' final fits, fine-tuning) distribute by
    themselves once the model and optimizer are created under `scope`;
  * extraction and prediction run `sharded` steps: each batch split over the
    replicas and gathered back in order;
  * cross-validation folds (`training.HeadTrainer`) train on one device: they take
    seconds, and a per-replica split of a 32-image batch would be all overhead.

Multi-host training is not offered: ``Model.fit`` under
MultiWorkerMirroredStrategy is broken in Keras 3 (keras-team/keras#20585);
extraction and prediction scale out with Ray instead (`features.serve.ray_engine`).
"""

import contextlib
import logging
from typing import Callable, Optional, Sequence

import tensorflow as tf

from small_photo_classifier.pipeline.errors import ConfigError

STRATEGIES = ("auto", "one", "mirrored")


def split_cpu(replicas: int) -> None:
    """Splits the first CPU into ``replicas`` logical devices (before TF initialises them)."""
    if replicas <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
    except RuntimeError as err:  # TF's devices were already initialised
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != replicas:
            raise ConfigError(f"--cpu_replicas={replicas} must be applied before TensorFlow "
                              f"starts; this process already has {existing} CPU device(s).") \
                from err


def make_strategy(name: str = "auto", cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """The strategy for ``--strategy`` (and ``--cpu_replicas``); logs what it chose.

    auto: mirrored over all local GPUs when there are two or more, or over the CPU
    replicas when ``cpu_replicas`` >= 2; otherwise one device.
    """
    name = (name or "auto").strip().lower()
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy={name!r}: choose one of {', '.join(STRATEGIES)}.")
    if cpu_replicas < 0:
        raise ConfigError(f"--cpu_replicas must be 0 or more; got {cpu_replicas}.")
    split_cpu(cpu_replicas)
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    devices = gpus if gpus else cpus
    wanted = len(gpus) >= 2 or (not gpus and cpu_replicas >= 2)
    if name == "one" or (name == "auto" and not wanted):
        strategy = tf.distribute.get_strategy()  # the default: one device, no replicas
        logging.info("Strategy: one device (%s).", gpus[0] if gpus else "CPU")
        return strategy
    # CPU replicas cannot use NCCL; reducing on one device works everywhere.
    ops = None if gpus else tf.distribute.ReductionToOneDevice()
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
    logging.info("Strategy: mirrored over %d replicas (%s); global batch = --batch_size, "
                 "split between them.", strategy.num_replicas_in_sync, ", ".join(devices))
    return strategy


def replicas() -> int:
    """Replicas of the strategy in scope (1 outside any)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


@contextlib.contextmanager
def scope(strategy: tf.distribute.Strategy):
    """Everything built inside (models, optimizers) is mirrored over the replicas."""
    with strategy.scope():
        yield strategy


def sharded(fn: Callable, input_shape: Optional[Sequence[int]] = None) -> Callable:
    """A compiled ``fn(batch)`` that, under a multi-replica strategy, splits the batch
    between the replicas and concatenates their outputs in input order.

    ``fn`` maps a batch tensor to a tensor or a dict of tensors with the batch as
    first axis. The batch is padded with zero rows to a multiple of the replica
    count and the padded rows are dropped from the result: no replica ever gets
    an empty batch, which oneDNN's AVX-512 convolution rejects ("input depth must
    be evenly divisible by filter depth") when the last batch of a run is smaller
    than the number of devices, the normal case on a multi-GPU host.

    With ``input_shape`` (one example's shape) the function is traced once for every
    batch size, instead of once per size seen.
    """
    strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    signature = (None if input_shape is None else
                 [tf.TensorSpec([None, *input_shape], tf.float32)])
    if replicas == 1:
        return tf.function(fn, input_signature=signature, reduce_retracing=True)

    def run(batch):
        n = tf.shape(batch)[0]
        per = (n + replicas - 1) // replicas
        padding = [[0, per * replicas - n]] + [[0, 0]] * (len(batch.shape) - 1)
        padded = tf.pad(batch, padding)

        def shard(ctx):
            return padded[ctx.replica_id_in_sync_group * per:
                          (ctx.replica_id_in_sync_group + 1) * per]
        parts = strategy.run(fn, args=(strategy.experimental_distribute_values_from_function(
            shard),))
        return tf.nest.map_structure(lambda t: strategy.gather(t, axis=0)[:n], parts)
    return tf.function(run, input_signature=signature, reduce_retracing=True)
