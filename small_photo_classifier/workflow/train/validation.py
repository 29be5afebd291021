"""What the export decides on the validation images: the final model's scores, bag or
single model, one view or two; each model above its cached layer.

The models compared share the frozen layers below the layer their trained blocks start
from, and the validation images' features there are cached: each model is scored from
those features (`features.serve.inference.HeldOut`), and a mirrored view goes through the
frozen layers once for all of them. Only a model whose training reached below every
cached layer is run whole.
"""

import logging

import numpy as np

from small_photo_classifier.features import scenarios
from small_photo_classifier.features.choose import bag as bag_lib, evidence
from small_photo_classifier.features.serve import inference
from small_photo_classifier.features.store import cache as cache_lib
from small_photo_classifier.pipeline import groups as groups_lib
from small_photo_classifier.workflow.base.config import CacheConfig, PredictConfig
from small_photo_classifier.workflow.train.job import Features, Job


def held_out(job: Job, cache: CacheConfig, batch_size: int) -> inference.HeldOut:
    """The validation images for the export's comparisons: their cached features, and
    each other view computed once (`inference.HeldOut`)."""
    _, val, _ = Features(job, cache, batch_size).split()
    return inference.HeldOut(job.classifier, job.val.path.tolist(), job.model.image_size,
                             batch_size, cached={k: np.asarray(v) for k, v in val.items()})


def above_cache(job: Job, model, blocks):
    """``model`` (the classifier's, its ``blocks`` trained) as (the part above the frozen
    layers, the cached layer it starts from); (model, None) when the blocks reach below
    every cached layer, so the whole network changed."""
    start = job.classifier.start_layer(blocks)
    if start not in cache_lib.cached_layers(job.model.include_top, job.classifier.net):
        return model, None
    return job.classifier.model_from(start), start


def validate(job: Job, held: inference.HeldOut, model_at, tta: int = 1):
    """(scores, probabilities) on the validation images of a model given as (part, layer):
    the part above the frozen layers, fed ``held``'s features at ``layer`` (no image goes
    through the frozen layers again); or as (whole model, None)."""
    model, layer = model_at
    if layer is None:
        outputs = inference.predict_paths(model, job.val.path.tolist(), job.val.name.tolist(),
                                          job.model.image_size, held.batch_size, tta,
                                          progress=False)
    else:
        outputs = held.outputs(model, layer, tta)
    probs = job.task.probabilities(outputs)
    return job.task.scores(job.y_val, probs), probs


def bag(job: Job, scenario: str, single, members):
    """The bag of ``members`` (a `features.choose.bag.members_model`) and the classifier, in
    the form ``single`` (see `above_cache`) has: (the part above the members' start
    layer, that layer), or (one image -> output model, None)."""
    start = bag_lib.member_start(job.classifier, scenarios.get_scenario(scenario).blocks)
    if single[1] is None:
        return bag_lib.assemble(job.classifier, start, members), None
    return bag_lib.on_features(job.classifier, start, members), start


def choose_output(job: Job, held: inference.HeldOut, models, single_probs,
                  predict: PredictConfig) -> dict:
    """Bag or single model, and how many TTA views, by evidence on the validation images.
    ``models``: (the single model and the bag as `above_cache` and `bag` give them, the
    bag's fold members); the bag and its members are None without a bag."""
    task, out = job.task, {"default": "model", "tta": 1, "decisions": {}}
    base_probs, (single, bag, members) = single_probs, models
    chosen = single
    if bag is not None:
        bag_scores, bag_probs = validate(job, held, bag)
        bag_vs_single = evidence.compare(task, job.y_val, bag_probs, single_probs, job.seed,
                                         clusters=groups_lib.of(job.val))
        logging.info("Bag vs single model: %s", bag_vs_single.describe("bag", "single model"))
        out["decisions"]["bag_vs_single"] = bag_vs_single.summary()
        out["bag_scores"] = {"members": bag_lib.size(members) + 1,
                             **{f"val_{k}": v for k, v in bag_scores.items()}}
        if bag_vs_single.better:
            out["default"], base_probs, chosen = "bag", bag_probs, bag
    out["tta"] = choose_tta(job, held, out, base_probs, chosen, predict)
    return out


def choose_tta(job: Job, held: inference.HeldOut, out: dict, base_probs, model_at,
               predict: PredictConfig) -> int:
    """``--tta`` as given, or (auto) 2 views when they beat 1 beyond noise."""
    if predict.tta != "auto":
        return int(predict.tta)
    _, mirrored = validate(job, held, model_at, tta=2)
    tta = evidence.compare(job.task, job.y_val, mirrored, base_probs, job.seed,
                           clusters=groups_lib.of(job.val))
    logging.info("Test-time augmentation: %s", tta.describe("2 views", "1 view"))
    out["decisions"]["tta2_vs_tta1"] = tta.summary()
    return 2 if tta.better else 1
