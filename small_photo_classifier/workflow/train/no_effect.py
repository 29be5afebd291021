"""Flags the user passed that could not change this run, and why: recorded in
``metrics.json`` (``no_effect``), printed with the run's summary and shown in
``report.html``, so that a setting listed among the run's flags is never mistaken for
one that shaped the model (e.g. ``--finetune_epochs=2`` on a run that exported the
linear probe, which no epoch trains)."""

from typing import Dict, Iterable

from small_photo_classifier.workflow.base import state as state_lib
from small_photo_classifier.workflow.train.export import PROBE
from small_photo_classifier.workflow.train.job import Job

# The flags that act only when a scenario's head is fine-tuned.
FINETUNE_FLAGS = ("finetune_epochs", "finetune_learning_rate", "finetune_views",
                  "trainable_blocks", "augment", "augment_on", "patience", "monitor",
                  "resume")
# Those the whole network's fine-tuning uses too (when it was tried).
WHOLE_USES = ("augment", "augment_on", "monitor", "resume")
# The flags that act only when the whole network is fine-tuned.
WHOLE_FLAGS = ("whole_epochs", "whole_learning_rate", "whole_batch_size", "whole_patience")


def find(job: Job, given: Iterable[str], scenario: str, epochs: int) -> Dict[str, str]:
    """{flag: why it had no effect} among ``given`` (the flags on the command line), for
    a run whose final stage took ``scenario`` with ``epochs`` fine-tuning epochs asked."""
    given = set(given)
    finetune = job.run.metrics().get("finetune", {})
    export = state_lib.load(job.run.path).export
    if scenario == PROBE:
        why = ("the linear probe was exported (the heads stage's choice): no scenario's "
               "head was fine-tuned")
    elif finetune.get("skipped"):
        why = finetune["skipped"].split(" (")[0]
    elif epochs <= 0:
        why = "--finetune_epochs=0: no fine-tuning ran"
    else:
        why = None
    whole = job.run.metrics().get("whole_network", {})
    found = {f"--{f}": why for f in FINETUNE_FLAGS if why and f in given
             and not (f == "finetune_epochs" and epochs <= 0)
             and not (whole.get("tried") and f in WHOLE_USES)}
    if whole and not whole.get("tried"):
        found.update({f"--{f}": "whole-network fine-tuning was not tried: "
                      + whole.get("why", "").split(":")[0] for f in WHOLE_FLAGS if f in given})
    if "bag" in given and export is not None and export.default != "bag.keras" \
            and not job.run.metrics().get("bag"):
        found["--bag"] = ("no bag was made: it needs cross-validation and a scenario's head "
                          "(the probe has no fold heads)" if scenario == PROBE or not job.folds
                          else "no bag was made")
    return found


def record(job: Job, found: Dict[str, str]) -> None:
    """Writes ``found`` to metrics.json and says it on the console."""
    job.run.update_metrics("no_effect", found)
    for flag, why in found.items():
        print(f"{flag} had no effect on this run: {why}.")
