"""Settings objects: how heads are fitted and how fine-tuning runs.

Each is built once per run from the flags (`workflow.base.config`) and passed down whole,
instead of the same bundle of keyword arguments (epochs, batch size, seed, class
weights, label smoothing, progress) being threaded through every level.
A step that needs one value changed (a fold's seed, the refit's epochs) uses `replace`.
"""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """How a head trains on cached features (CV folds, final fits, sweep, refit).

    epochs: the most epochs a fit may train (with ``patience``), or exactly this many.
    patience: a fit with held-out rows (cross-validation folds, a validation split) stops
      once its score has not improved for this many epochs: the epoch is chosen by
      evidence, and ``epochs`` is only the maximum. None: every epoch is trained.
    class_weight: {class index: weight} (binary and multi-class), or None.
    progress: show progress bars and per-scenario lines.
    scratch_dir: where cross-validation may park large fold states between its rounds
      (None: the system's temporary folder).
    """
    epochs: int
    batch_size: int
    seed: int = 0
    class_weight: Optional[dict] = None
    label_smoothing: float = 0.0
    progress: bool = True
    patience: Optional[int] = None
    scratch_dir: Optional[str] = None

    def replace(self, **changes) -> "FitSettings":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How the chosen blocks train end to end (`features.fit.finetune`).

    augment: augmentation preset (`pipeline.augment.PRESETS`); augment_on: where it runs:
      "pipeline" (tf.data, on the CPU), "model" (an `Augment` layer in the training
      model, so on the accelerator) or "auto" (the model when there is a GPU).
    monitor: early stopping's and the checkpoint's metric (None: the task's headline).
    resume: continue from the run folder's last checkpoint.
    tensorboard_dir: TensorBoard logs go to ``<tensorboard_dir>/finetune`` (None: none).
    warmup_epochs: the learning rate rises linearly from 0 over this many epochs, then
      follows a cosine to 0 at ``schedule_epochs`` (0: a constant rate, no schedule).
    schedule_epochs: the epochs the schedule spans (None: ``epochs``); a refit that
      trains the kept epochs of a longer run follows that run's rates.
    """
    epochs: int
    image_size: int
    batch_size: int
    learning_rate: float
    augment: str = "none"
    augment_on: str = "auto"
    optimizer: str = "adam"
    patience: int = 5
    monitor: Optional[str] = None
    seed: int = 0
    class_weight: Optional[dict] = None
    label_smoothing: float = 0.0
    resume: bool = False
    tensorboard_dir: Optional[str] = None
    warmup_epochs: float = 0.0
    schedule_epochs: Optional[int] = None

    def replace(self, **changes) -> "FinetuneSettings":
        return dataclasses.replace(self, **changes)
