"""Every file and folder a run folder can hold, with its role: one place that the
console's "Outputs in ..." list, the README's table of run-folder files and the tests
read, so that none of them can name a file the run did not write or leave one out.

Names are written as the README writes them: ``<S>`` a scenario letter, ``<stage>`` a
later stage, ``<q>`` a quantisation, ``<output>`` the stem of predict.py's ``--output``.
Four JSON files, four roles: ``run_config.json`` what was asked (the flags),
``run_state.json`` what each stage decided (read by later stages), ``metrics.json``
what was measured (for people and the report), ``model_info.json`` what prediction
needs (read by predict.py, serve.py and exports).
"""

import fnmatch
import os
import re
from typing import List, Optional, Tuple

# (name as the README writes it, role), in the order a newcomer reads them.
FILES: Tuple[Tuple[str, str], ...] = (
    ("report.html", "the whole run on one page: start here"),
    ("train.log", "every line the console showed, and the detail"),
    ("run_config.json", "what was asked: every flag value of the run"),
    ("run_state.json", "what each stage decided, for the stages after it"),
    ("metrics.json", "what was measured: every score, time and peak memory"),
    ("model.keras", "the exported model, before calibration (safe_mode=True loads it after "
                    "import small_photo_classifier.keras_layers; "
                    "small_photo_classifier.load(RUN) predicts as predict.py)"),
    ("model_info.json", "what prediction needs: size, classes, calibration, thresholds"),
    ("reference_features.npz", "the unfamiliar score's reference features"),
    ("bag.keras", "the bag's fold heads (predict.py averages them with model.keras)"),
    ("split.csv", "the train/validation split"),
    ("confusion_matrix.png", "the final model before any refit, on the validation images"),
    ("roc.png", "the final model before any refit, on the validation images"),
    ("top_losses.png", "the same model's most confident mistakes (validation)"),
    ("top_losses_heatmaps.png", "the same mistakes with heatmaps: where the model looked"),
    ("classification_report.csv", "the same model per class (validation)"),
    ("reliability.png", "calibration before and after (held-out predictions)"),
    ("unfamiliar_scores.png", "the unfamiliar score of held-out known photos"),
    ("heads_comparison.png", "the probe and the scenarios, score per epoch"),
    ("heads/", "per scenario S trained on the cached features: its weights "
               "(<S>.weights.h5) and a folder <S>/ with its epochs (history.csv) and, "
               "for the best, its plots; the bag's fold heads (bag/), out-of-fold "
               "predictions (oof.npz)"),
    ("history_finetune.csv", "fine-tuning per epoch (the whole network's when it was tried)"),
    ("finetune_history.png", "fine-tuning curves (the whole network's when it was tried)"),
    ("finetune/", "fine-tuning checkpoints while it runs (for --resume)"),
    ("backbones.csv", "--backbone=auto / --stage=backbones: one row per candidate"),
    ("backbones.png", "the candidates' score against cost"),
    ("sweep.csv", "--stage=sweep: one row per configuration"),
    ("sweep.png", "--stage=sweep: CV score per configuration"),
    ("suspect_labels.csv", "training labels that look wrong (only when there are some)"),
    ("suspect_labels.png", "their photos"),
    ("duplicates.csv", "duplicate photos across the splits (only when there are some)"),
    ("submission.csv", "the test folder's predictions (a data folder with test/)"),
    ("bad_images.csv", "--on_bad_image=skip: the images skipped and why"),
    ("bad_test_images.csv", "test photos that got no prediction, and why"),
    ("tensorboard/", "TensorBoard logs (--notensorboard: none)"),
    ("learning_curve.csv", "--stage=curve: the score against the number of labels"),
    ("learning_curve.png", "--stage=curve: the same, drawn"),
    ("to_label.csv", "--stage=label_next: the photos to label next"),
    ("to_label.png", "--stage=label_next: their contact sheet"),
    ("labels_template.csv", "--stage=label_next: the labels to fill in"),
    ("bad_unlabelled_images.csv", "--stage=label_next: unlabelled photos skipped, and why"),
    ("run_config_<stage>.json", "a later stage's settings (curve, label_next)"),
    ("savedmodel/", "--export=savedmodel"),
    ("model.onnx", "--export=onnx"),
    ("model.tflite", "--export=tflite"),
    ("model_<q>.tflite", "--export=tflite --quantize=<q>"),
    ("labels/", "serve.py's label page: the answers (reviewed.csv)"),
    ("<output>.csv", "predict.py's predictions (the demo's next command: test_predictions)"),
    ("<output>.log", "predict.py's log"),
    ("<output>_report.html", "predict.py --labels: its scores as a page"),
    ("<output>_metrics.json", "predict.py --labels: its scores"),
    ("<output>_<plot>.png", "predict.py --labels: ROC, confusion matrix, top losses"),
    ("<output>_unfamiliar.png", "predict.py: the most unfamiliar photos"),
    ("<output>_unfamiliar.csv", "predict.py, Kaggle layout: the unfamiliar columns"),
)


def _pattern(name: str) -> str:
    """A README name as a glob: every ``<...>`` part matches anything."""
    return re.sub(r"<[^>]+>", "*", name.rstrip("/"))


def _match(entry: str) -> Optional[int]:
    """Index in `FILES` of the name ``entry`` is: an exact name, else the most specific
    pattern it matches (the most literal characters: ``x_unfamiliar.png`` is
    ``<output>_unfamiliar.png``, not ``<output>_<plot>.png``), else None."""
    for i, (name, _) in enumerate(FILES):
        if entry == name.rstrip("/"):
            return i
    matches = [i for i, (name, _) in enumerate(FILES)
               if "<" in name and fnmatch.fnmatchcase(entry, _pattern(name))]
    if not matches:
        return None
    return max(matches, key=lambda i: (len(re.sub(r"<[^>]+>", "", FILES[i][0])), -i))


def role(entry: str) -> Optional[str]:
    """The role of a run folder's top-level ``entry`` (a file or folder name), or None
    when no run writes it."""
    i = _match(entry)
    if i is None:
        return None
    name, what = FILES[i]
    return _filled(name, what, entry) if "<" in name else what


def _filled(name: str, what: str, entry: str) -> str:
    """``what`` with each ``<...>`` of ``name`` replaced by what ``entry`` has there
    (model_int8.tflite: "--export=tflite --quantize=int8")."""
    parts = re.split(r"(<[^>]+>)", name.rstrip("/"))
    regex = "".join("(.+)" if p.startswith("<") else re.escape(p) for p in parts)
    found = re.fullmatch(regex, entry)
    if found:
        for placeholder, value in zip([p for p in parts if p.startswith("<")], found.groups()):
            what = what.replace(placeholder, value)
    return what


def listing(folder: str) -> List[str]:
    """One line per entry of ``folder``, in the order of `FILES`, with its role; an
    entry no run writes is listed last as "(not written by this tool)". Temporary
    files of an interrupted write (``.tmp-*``) are left out."""
    entries = [e for e in sorted(os.listdir(folder)) if not e.startswith(".tmp-")]

    def rank(entry):
        i = _match(entry)
        return len(FILES) if i is None else i

    model = os.path.join(folder, "model.keras")
    exported = os.path.getmtime(model) if os.path.isfile(model) else None
    width = max((len(e) for e in entries), default=0) + 1
    lines = []
    for entry in sorted(entries, key=lambda e: (rank(e), e)):
        path = os.path.join(folder, entry)
        shown = entry + ("/" if os.path.isdir(path) else "")
        what = role(entry) or "(not written by this tool)"
        # A prediction of an earlier model.keras describes a model the folder no longer
        # holds (e.g. after --stage=finetune exported another one): said, never deleted.
        if (what.startswith("predict.py") and exported is not None
                and os.path.getmtime(path) < exported):
            what += " [made by an earlier model.keras: predict again]"
        lines.append(f"  {shown:{width}s} {what}")
    return lines
