"""The one loader of a run folder for prediction: the run's default model (the bag or the
single model, as train.py chose in ``model_info.json``), its test-time augmentation, its
calibration and its unfamiliar score's reference features. predict.py, serve.py and the
Python API (`small_photo_classifier.load`) all predict through a `Loaded`, so they give
the same numbers for the same photos."""

import dataclasses
import os
from typing import Optional

import numpy as np

from small_photo_classifier.features.task import Task


@dataclasses.dataclass
class Loaded:
    """A run folder loaded for prediction. ``outputs`` are the network's raw outputs
    (the model's ``units`` columns, then the pooled features the unfamiliar score
    reads); `apply` turns them into calibrated probabilities and the unfamiliar score."""
    workdir: str
    info: dict
    task: Task
    model: object
    units: int
    reference: Optional[np.ndarray]  # None: no unfamiliar score (an old run, or Ray)
    use_bag: bool
    tta: int
    policy: str

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def model_file(self) -> str:
        from small_photo_classifier.features.serve import inference
        return inference.BAG_FILE if self.use_bag else inference.MODEL_FILE

    def describe(self) -> str:
        """``bag of 5 models, tta=2`` or ``one model, tta=1``."""
        return (f"bag of {self.info.get('bag', {}).get('members', '?')} models" if self.use_bag
                else "one model") + f", tta={self.tta}"

    def predict_frame(self, frame, batch_size: int = 32, progress: bool = True, remote=None):
        """Raw outputs of a frame's photos (``path, name``, optionally ``bad``: NaN rows)."""
        from small_photo_classifier.features.serve import inference
        return inference.predict_frame(self.model, frame, self.image_size, batch_size,
                                       self.tta, progress=progress, remote=remote)

    def predict_images(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Raw outputs of images already through the eval path ([N, S, S, 3])."""
        from small_photo_classifier.features.serve import inference
        return inference.predict_images(self.model, images, batch_size, self.tta)

    def apply(self, outputs, info: Optional[dict] = None):
        """(calibrated probabilities, unfamiliar or None): `trusted.apply` with this run's
        calibration (or ``info``'s, e.g. moved to another prior)."""
        from small_photo_classifier.workflow.use import trusted
        return trusted.apply(self.task, info or self.info, outputs, self.units, self.reference)


def load(workdir: str, bag: Optional[bool] = None, tta="auto", precision: str = "auto",
         unfamiliar: bool = True) -> Loaded:
    """Loads ``workdir`` (a train.py run folder) for prediction.

    ``bag``: None for what train.py chose, else whether to use ``bag.keras`` (when the run
    has one); ``tta``: ``"auto"`` (the run's choice) or a number of views; ``precision``:
    as ``--precision`` (sets Keras' dtype policy); ``unfamiliar``: load the reference
    features and compute the unfamiliar score in the same pass."""
    from small_photo_classifier.features import precision as precision_lib
    from small_photo_classifier.features.serve import inference
    from small_photo_classifier.pipeline import run_info
    from small_photo_classifier.workflow.use import trusted
    info = run_info.read_info(workdir)
    task = Task.of_model(info)
    policy = precision_lib.resolve_and_apply(precision).policy
    wanted = bag if bag is not None else info.get("default_model", "bag") == "bag"
    use_bag = bool(wanted) and os.path.isfile(os.path.join(workdir, inference.BAG_FILE))
    views = int(info.get("tta", 1)) if tta == "auto" else int(tta)
    reference = trusted.load_reference(workdir, info) if unfamiliar else None
    model, info, units = inference.load_predictor(workdir, use_bag, policy, reference is not None)
    if int(model.output.shape[-1]) == units:
        reference = None  # an old whole-network bag: no features to score with
    return Loaded(workdir, info, task, model, units, reference, use_bag, views, policy)


def load_classifier(workdir: str, precision: str = "auto"):
    """The run's single exported model (``model.keras``) as its parts (stem, last stage,
    head: `features.serve.explain.Parts`): what a heatmap needs (a bag's members share
    its trunk)."""
    from small_photo_classifier.features import precision as precision_lib
    from small_photo_classifier.features.serve import explain, inference
    policy = precision_lib.resolve_and_apply(precision).policy
    model, _ = inference.load_exported(workdir, bag=False, policy=policy)
    return explain.parts_of(model)
