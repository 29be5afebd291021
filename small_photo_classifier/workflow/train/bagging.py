"""The bag's members: the chosen scenario's fold heads, trained again on the cached
features at the epoch its cross-validation chose (`features.fit.heads.fold_members`).

They are made after the heads stage, unless the final stage will try whole-network
fine-tuning first: then they wait for its verdict (`Job.pending_bag`), since a bag of
frozen fold heads is of no use once the whole network is exported (seedlings12: 298 s of
a 37-minute job), and are made only if the frozen model stays.
"""

import logging

from small_photo_classifier.features.choose import bag as bag_lib
from small_photo_classifier.features.fit import heads as heads_lib
from small_photo_classifier.workflow.train import heads_choice
from small_photo_classifier.workflow.train import whole as whole_lib
from small_photo_classifier.workflow.train.job import Features, Job, fit_settings

STAGE = "bag members (the chosen scenario's folds again)"


def whole_first(job: Job, mode: str, scenario: str) -> bool:
    """Whether the final stage will try whole-network fine-tuning (the plan it makes,
    from the same honest predictions)."""
    frozen = heads_choice.load_honest(job, scenario)
    return whole_lib.plan(job, mode, frozen.probs, frozen.what).tried


def make_or_defer(job: Job, best, settings, views, folder: str, defer: bool) -> None:
    """Makes the bag of ``best`` (a scenario's result with its cross-validation) now, or
    with ``defer`` leaves the making in ``job.pending_bag``. ``settings``: the heads',
    cache's and runtime's configs; ``views``: (augmented views, their preset)."""
    heads, cache, runtime = settings

    def make():
        train, _, view_feats = Features(job, cache, runtime.batch_size).split(*views)
        save(job, best, heads_lib.FeatureSplit(train, job.y_train, view_feats, job.folds),
             fit_settings(job, heads, cache, runtime), folder)
    if defer:
        job.pending_bag = make
        logging.info("Bag members: made only if the whole network is not exported.")
        return
    with job.clock.stage(STAGE):
        make()


def save(job: Job, best, train: heads_lib.FeatureSplit, fit, folder: str) -> None:
    """The bag's members: the best scenario's fold heads at the epoch its cross-
    validation chose (`heads.fold_members`), trained again, saved in ``folder``."""
    blocks = best.config.row.blocks
    weights = heads_lib.fold_members(job.classifier, best.config, job.task, train, fit,
                                     best.cv.epoch)
    members = [bag_lib.as_member(job.classifier, blocks, m) for m in weights]
    path = bag_lib.save(bag_lib.members_model(job.classifier, blocks, members),
                        bag_lib.members_file(folder, best.scenario))
    logging.info("Bag: the %d fold heads of scenario %s (its cross-validation's folds at "
                 "epoch %d) saved in %s.", len(members), best.scenario, best.cv.epoch, path)
