"""The final model: fine-tune the chosen scenario, choose the default output by evidence,
refit on every label, export.

What a run exports, and why, is decided on held-out images, never by principle:

* **probe or deep head** — the heads stage compares them on out-of-fold
  predictions (validation without CV) and a probe that is better beyond noise
  is exported itself, as a small Keras head on the frozen base;
* **bag or single model** — the bag (the K fold heads kept by cross-validation
  plus the final model) is the default only when it beats the single model on
  the validation images beyond noise (`features.choose.evidence`); ``bag.keras`` is
  written either way, for ``predict.py --bag``;
* **test-time augmentation** — two views (image and mirror) only when they beat
  one view the same way;
* **refit** — when cross-validation made the choices (small data), the exported
  model is trained again on training + validation images with the chosen
  settings (head epochs from CV, fine-tuning epochs from the validation run). Its
  expected score is the CV estimate: it has no held-out images of its own.
"""

import dataclasses
import logging
import os
from typing import Optional

import numpy as np

from small_photo_classifier.features import scenarios
from small_photo_classifier.features.choose import bag as bag_lib, honest
from small_photo_classifier.features.fit.loop import restore
from small_photo_classifier.features.fit.settings import FinetuneSettings
from small_photo_classifier.features.serve import inference
from small_photo_classifier.pipeline import groups as groups_lib
from small_photo_classifier.pipeline.atomic import atomic_link
from small_photo_classifier.workflow.base import state as state_lib
from small_photo_classifier.workflow.base.config import (CacheConfig, FinetuneConfig, RuntimeConfig,
                                                         TrainConfig)
from small_photo_classifier.workflow.train import (augment_choice, final_fit, final_model,
                                                   heads_choice, trusting, validation)
from small_photo_classifier.workflow.train import whole as whole_lib
from small_photo_classifier.workflow.train.job import Job, finetune_settings, fit_settings
from small_photo_classifier.workflow.views import summary

PROBE = final_model.PROBE


def finetune_stage(job: Job, cfg: TrainConfig, scenario: str, optimizer: str = "adam") -> None:
    """Tries whole-network fine-tuning when it could win (`workflow.train.whole`), else
    fine-tunes ``scenario`` (or takes the probe); chooses the default output, refits on
    every label (``--refit``), and exports. Reads the heads', cache's, runtime's,
    prediction's and fine-tuning's settings of ``cfg``."""
    heads, cache, runtime, predict = cfg.heads, cfg.cache, cfg.runtime, cfg.predict
    refit = heads.refit
    frozen = heads_choice.load_honest(job, scenario)
    plan = whole_lib.plan(job, cfg.finetune.whole, frozen.probs, frozen.what)
    whole_lib.log_plan(plan)
    job.run.update_metrics("whole_network", {"tried": plan.tried, "why": plan.why})
    if plan.tried:
        cfg = _with_finetune(cfg, _augment_resolved(job, cfg.finetune, cache, runtime))
        if _try_whole(job, cfg, scenario, frozen):
            return
        # The frozen model stays, as the heads stage made it: its own fine-tuning is what
        # the whole network's just did better than it could (the last stage trained too).
        cfg = _with_finetune(cfg, dataclasses.replace(cfg.finetune, epochs=0))
    if job.pending_bag is not None:  # the frozen model stays: its bag is wanted now
        logging.info("Bag members: the frozen model is exported, so its bag is made now.")
        make, job.pending_bag = job.pending_bag, None
        make()
    config = cfg.finetune
    if scenario == PROBE:
        return final_model.export_probe(job, heads, cache, runtime, predict, refit, frozen)
    final_fit.load_head(job, heads, cache, runtime, config, scenario)
    blocks = (scenarios.parse_blocks(config.trainable_blocks, job.classifier.net)
              if config.trainable_blocks
              else scenarios.get_scenario(scenario).blocks_on(job.classifier.net))
    logging.info("Fine-tuning scenario %s (blocks %s).", scenario, ",".join(blocks))
    result = {"scenario": scenario, "blocks": blocks, "optimizer": optimizer}
    fine = finetune_settings(job, config, heads, runtime, optimizer)
    skipped = _cannot_improve(job, config, scenario)
    ft = None
    if skipped:
        print(skipped)
        result["skipped"] = skipped
    elif config.epochs > 0:
        config = _augment_resolved(job, config, cache, runtime)
        cfg = _with_finetune(cfg, config)
        fine = fine.replace(augment=config.augment)
        ft = final_fit.finetune(job, config, cache, scenario, blocks, fine)
    kept = ft["best_epoch"] if ft else 0
    described = (_described(scenario, config.epochs, kept) if not skipped else
                 f"scenario {scenario} (its head; fine-tuning skipped: it could not beat it)")
    if config.epochs > 0 and kept == 0 and not skipped:
        print("fine-tuning did not improve on the head: exporting the head")
    _finish(job, cfg, Final(scenario, blocks, described, ft, fine,
                            frozen if kept == 0 else None, bag=heads.bag), result)


def _with_finetune(cfg: TrainConfig, finetune: FinetuneConfig) -> TrainConfig:
    """``cfg`` with the fine-tuning settings this run resolved (e.g. --augment=auto's
    preset), so that the refit and the records use them."""
    return dataclasses.replace(cfg, finetune=finetune)


@dataclasses.dataclass
class Final:
    """The model about to be exported: its scenario (the head it started from), the
    blocks that trained, its name, its fine-tuning's summary (None: not fine-tuned) and
    settings, the frozen model's honest predictions when it is that model, and whether
    a bag may be offered beside it; the estimate of its score (probabilities on held-out
    images and how they were made)."""
    scenario: str
    blocks: list
    described: str
    ft: Optional[dict]
    fine: FinetuneSettings
    frozen: Optional[object] = None
    bag: bool = True
    estimate_probs: Optional[np.ndarray] = None
    estimate_how: str = ""


def _finish(job: Job, cfg: TrainConfig, final: Final, result: dict) -> None:
    """Everything after the training: the final report on the validation images, bag or
    single model and TTA, calibration and the unfamiliar score, the refit, the export."""
    cache, runtime, predict, refit = cfg.cache, cfg.runtime, cfg.predict, cfg.heads.refit
    scenario, blocks, ft = final.scenario, final.blocks, final.ft
    checkpoints, kept = None, 0
    if ft is not None:
        checkpoints, kept = ft.pop("checkpoints"), ft["best_epoch"]
        epoch_probs = ft.pop("epoch_probs", None)
        if final.estimate_probs is None and kept > 0 and epoch_probs:
            final.estimate_probs, _ = honest.cross_fit(
                job.task, job.y_val, epoch_probs, job.seed,
                by="loss" if final.fine.monitor == "loss" else "headline",
                groups=groups_lib.of(job.val))
            final.estimate_how = (f"the {len(job.y_val)} validation images, each predicted "
                                  "at the fine-tuning epoch chosen on the other validation "
                                  "images")
        result.update(ft)
    if final.estimate_probs is None and final.frozen is not None:
        final.estimate_probs, final.estimate_how = final.frozen.probs, final.frozen.how
    held = validation.held_out(job, cache, runtime.batch_size)
    single = validation.above_cache(job, job.classifier.model, blocks)
    scores, probs = validation.validate(job, held, single)
    scores, thresholds = _scored(job, probs, scores, result)
    members = (bag_lib.load_members(_members_file(job, scenario))
               if final.bag and _bag_fits(job, scenario, blocks) else None)
    bag = validation.bag(job, scenario, single, members) if members is not None else None
    choice = validation.choose_output(job, held, (single, bag, members), probs, predict)
    start = job.classifier.start_layer(blocks)
    # (Out-of-fold predictions are of this model if it trained above the frozen features.)
    oof_ok = kept == 0 and start not in (job.classifier.net.stem_layer, scenarios.INPUT)
    trusted = trusting.fit_held_out(job, cache, runtime.batch_size, scenario, start, probs,
                                    predict, oof_ok)
    if refit:
        settings = (fit_settings(job, cfg.heads, cache, runtime),
                    final.fine.replace(epochs=kept, schedule_epochs=final.fine.epochs))
        result["refit"] = final_fit.refit(job, cfg.finetune, cache, scenario, blocks, *settings)
    job.run.update_metrics("finetune", result)
    final_model.record_final(job, final.described, scores, thresholds)
    choice["model_info"] = final_model.trust(job, cache, runtime, trusted, start, refit)
    estimate = final_model.expected_score(job, final.estimate_probs, final.estimate_how,
                                          final.described, scores)
    _export(job, final, (scores, thresholds), members, choice, estimate, refit)
    if checkpoints is not None:
        checkpoints.remove()  # exported: nothing left to resume (kept when a run fails)
    state = state_lib.load(job.run.path)
    probe_score = state.probe.val_score if state.probe else None
    print(summary.final(job.task, final.described, scores, probe_score,
                        choice.get("bag_scores"), len(job.val), estimate, refit))


def _augment_resolved(job: Job, config: FinetuneConfig, cache: CacheConfig,
                      runtime: RuntimeConfig) -> FinetuneConfig:
    """``config`` with ``--augment=auto`` replaced by the preset the evidence chooses
    (`workflow.train.augment_choice`), recorded in metrics.json."""
    if config.augment != "auto":
        return config
    chosen, record = augment_choice.choose(job, cache, runtime.batch_size)
    job.run.update_metrics("augment", record)
    print(f"augmentation for fine-tuning: {chosen} (--augment=auto: the preset whose views "
          f"most help the probe on plain photos; {', '.join(f'{p} {v:.4f}' for p, v in record[f'cv_{job.task.headline}_by_preset'].items())})")
    return dataclasses.replace(config, augment=chosen)


def _try_whole(job: Job, cfg: TrainConfig, scenario: str, frozen) -> bool:
    """Trains the whole network from a cache-trained head and exports it when its honest
    validation predictions beat the frozen model's beyond noise; returns whether it did
    (else the classifier is back at its starting weights)."""
    config, heads, cache, runtime = cfg.finetune, cfg.heads, cfg.cache, cfg.runtime
    start = whole_lib.start_scenario(job, scenario)
    if start is None:
        logging.info("Whole-network fine-tuning: no scenario was trained to start from.")
        return False
    final_fit.load_head(job, heads, cache, runtime, config, start)
    blocks = list(job.classifier.net.blocks)
    fine = whole_lib.settings(job, config, heads, runtime)
    print(f"Whole-network fine-tuning from scenario {start}'s head: at most {fine.epochs} "
          f"epochs of {len(job.train)} photos at {fine.image_size} px, augment={fine.augment}, "
          f"lr {fine.learning_rate:g} after a {fine.warmup_epochs:g}-epoch warm-up ...")
    ft = final_fit.finetune(job, config, cache, start, blocks, fine, what="the whole network")
    kept = ft["best_epoch"]
    probs, _ = honest.cross_fit(job.task, job.y_val, ft["epoch_probs"], job.seed,
                                by="loss" if fine.monitor == "loss" else "headline",
                                groups=groups_lib.of(job.val))
    decision = whole_lib.choose(job, frozen.probs, probs, frozen.what)
    job.run.update_metrics("whole_network", {
        "tried": True, "why": whole_lib.plan(job, config.whole, frozen.probs,
                                             frozen.what).why,
        "start": f"scenario {start}'s head", "kept_epoch": kept,
        "seconds": ft["seconds"], "decision": decision})
    if not decision["whole_network_kept"] or kept == 0:
        print(f"whole-network fine-tuning is not kept ({decision['why']}, on honest "
              f"validation predictions): {frozen.what} is exported")
        ft["checkpoints"].remove()
        restore(job.classifier.model, job.initial)
        job.heads.pop(start, None)  # reloaded from its file, as the heads stage saved it
        return False
    print(f"whole-network fine-tuning beats {frozen.what} on honest validation predictions "
          f"({decision['why']}; log loss {decision['loss']['candidate']:.4f} against "
          f"{decision['loss']['baseline']:.4f}): it is exported")
    final = Final(start, blocks, f"the whole network, fine-tuned from scenario {start}'s head",
                  ft, fine, bag=False, estimate_probs=probs, estimate_how=(
                      f"the {len(job.y_val)} validation images, each predicted at the epoch "
                      "chosen on the other validation images"))
    _finish(job, cfg, final, {"scenario": "whole", "start": start, "blocks": blocks,
                              "optimizer": fine.optimizer})
    return True


def _cannot_improve(job: Job, config: FinetuneConfig, scenario: str) -> Optional[str]:
    """Why fine-tuning cannot change what is exported, or None. An epoch is kept only
    when it beats the starting head on the monitored validation score; a head that
    already has the highest possible score (AUC, accuracy or mAP 1) cannot be beaten, so
    the epochs, and the augmented views they would train on, would be spent for
    nothing (the Kaggle-sized run: 186 s of view extraction, then "did not improve")."""
    monitor = config.monitor or job.task.headline
    head = state_lib.load(job.run.path).heads.get(scenario)
    if (config.epochs <= 0 or monitor != job.task.headline or head is None
            or head.val_score is None or head.val_score < 1.0):
        return None
    return (f"fine-tuning skipped: scenario {scenario}'s head already scores "
            f"{summary.label(monitor)} {head.val_score:.4f} on the {len(job.val)} validation "
            f"images, the highest possible, and an epoch is kept only when it beats the head "
            f"(--finetune_epochs={config.epochs} had no effect; --monitor=loss would still "
            "fine-tune)")


def _scored(job: Job, probs, scores: dict, result: dict):
    """The final report on the validation images; (scores, multi-label thresholds or
    None), both recorded in ``result``."""
    thresholds = final_model.final_report(job, probs, job.classifier.model)
    if thresholds is not None:
        scores = job.task.scores(job.y_val, probs, thresholds)
        result["thresholds"] = {"values": [round(float(t), 6) for t in thresholds],
                                "chosen_on": "validation (best F1 per label)"}
    result.update({f"val_{k}": v for k, v in scores.items()})
    return scores, thresholds


def _described(scenario: str, epochs: int, kept: int) -> str:
    """What the final model is, in words."""
    if epochs > 0 and kept == 0:
        return f"scenario {scenario} (fine-tuning did not improve on its head: the head)"
    return f"scenario {scenario}, fine-tuned" if epochs > 0 else f"scenario {scenario}"


def _members_file(job: Job, scenario: str) -> str:
    return bag_lib.members_file(job.run.file("heads", "bag"), scenario)


def _bag_fits(job: Job, scenario: str, blocks) -> bool:
    """Fold heads sit on the frozen layers below the scenario's start; --trainable_blocks
    reaching deeper changes those layers under them, so such a run gets no bag."""
    start = job.classifier.start_layer(scenarios.get_scenario(scenario).blocks)
    return job.classifier.start_layer(blocks) == start


def _export(job: Job, final: Final, scored, members, choice: dict, estimate: dict,
            refit: bool) -> None:
    """model.keras + model_info.json (+ bag.keras), and metrics.json's ``export``.
    ``scored``: the final model's (scores, multi-label thresholds) on the validation
    images; ``choice["model_info"]``: the calibration's and unfamiliar score's entries
    (`final_model.trust`)."""
    scenario, blocks, (scores, thresholds) = final.scenario, final.blocks, scored
    info = {**final_model.model_info(job, scenario, blocks, scores, thresholds), **choice["model_info"]}
    stale = job.run.file(inference.BAG_FILE)
    if members is not None:
        # The heads stage's file under a second name (no second copy); the bag is
        # model.keras (trunk and final model) plus these members from `start`.
        atomic_link(_members_file(job, scenario), stale)
        info["bag"] = {"members": bag_lib.size(members) + 1, "file": inference.BAG_FILE,
                       "start": bag_lib.member_start(
                           job.classifier, scenarios.get_scenario(scenario).blocks)}
        # The choice was measured with the model before the refit in both arms (the refit
        # model has no held-out images); the shipped bag holds the refit model.keras.
        measured = ("the K fold heads and the final model before the refit, on the validation "
                    "images; the shipped bag holds the refit model.keras in its place (a "
                    "refit model has no held-out images to measure the bag with)" if refit else
                    "the K fold heads and the final model, on the validation images")
        job.run.update_metrics("bag", {**choice["bag_scores"], "file": inference.BAG_FILE,
                                       f"single_model_val_{job.task.headline}":
                                           scores[job.task.headline],
                                       "default": choice["default"] == "bag",
                                       "measured_with": measured})
        if refit:
            logging.info("Bag: chosen with %s.", measured)
    elif os.path.exists(stale):
        os.remove(stale)  # never leave a bag from another run beside this model
    export = {"default": inference.BAG_FILE if choice["default"] == "bag" else
              inference.MODEL_FILE, "tta": choice["tta"], "refit": refit,
              "estimate": estimate, "decisions": choice["decisions"]}
    info.update({"default_model": choice["default"], "tta": choice["tta"], "refit": refit,
                 "estimate": export["estimate"]})
    job.run.update_metrics("export", export)
    state_lib.update(job.run.path, export=state_lib.ExportState(
        export["default"], int(choice["tta"]), bool(refit), export["estimate"]))
    inference.export_model(job.classifier.model, job.run.path, info)
    value, std = export["estimate"]["value"], export["estimate"].get("std")
    logging.info("Exported %s (default: %s, tta %d, %s); expected %s %s (%s).",
                 inference.MODEL_FILE, export["default"], choice["tta"],
                 "refit on every label" if refit else "trained on the training split",
                 export["estimate"]["metric"], "?" if value is None else
                 f"{value:.4f}" + (f" +- {std:.4f}" if std is not None else ""),
                 export["estimate"]["how"])
