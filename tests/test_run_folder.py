"""The run folder a newcomer can read (issue 42): flags that had no effect are named
with the reason, in metrics.json, on the console and in report.html; the console's list
of outputs is every file in the folder with its role; the label audit writes no empty
file and says "none found"."""

import json
import re
import types

from small_photo_classifier.workflow.base import outputs, run_files, state as state_lib
from small_photo_classifier.workflow.train import no_effect
from small_photo_classifier.workflow.views import report, summary


def _job(tmp_path, folds=((0,), (1,))):
    run = outputs.RunFolder(str(tmp_path))
    return types.SimpleNamespace(run=run, folds=list(folds))


def test_finetuning_flags_on_a_run_that_exported_the_probe_are_named(tmp_path, capsys):
    job = _job(tmp_path)
    state_lib.update(str(tmp_path), export=state_lib.ExportState("model.keras"))
    found = no_effect.find(job, ("data_dir", "finetune_epochs", "augment"), "probe", 2)
    assert set(found) == {"--finetune_epochs", "--augment"}
    assert all("linear probe was exported" in why for why in found.values())
    no_effect.record(job, found)
    assert "--finetune_epochs had no effect on this run: the linear probe" in \
        capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["no_effect"] == found
    (tmp_path / "run_config.json").write_text(json.dumps({"finetune_epochs": 2}))
    page = open(report.write_run_report(str(tmp_path))).read()
    assert "Flags that had no effect on this run" in page and "--finetune_epochs" in page


def test_a_skipped_finetuning_names_its_reason_and_flags_that_acted_are_not_named(tmp_path):
    job = _job(tmp_path)
    job.run.update_metrics("finetune", {"skipped": "fine-tuning skipped: scenario B's head "
                                                   "already scores AUC 1.0000 (details)"})
    found = no_effect.find(job, ("finetune_epochs",), "B", 5)
    assert found == {"--finetune_epochs": "fine-tuning skipped: scenario B's head already "
                                          "scores AUC 1.0000"}
    job.run.update_metrics("finetune", {"best_epoch": 3})
    assert no_effect.find(job, ("finetune_epochs", "augment"), "B", 5) == {}
    # Not given on the command line: a default is not the user's claim.
    assert no_effect.find(job, (), "probe", 5) == {}


def test_the_outputs_list_is_every_entry_with_its_role_in_the_readme_order(tmp_path):
    for name in ("zzz.txt", "metrics.json", "report.html", "model_int8.tflite"):
        (tmp_path / name).write_text("x")
    (tmp_path / "heads").mkdir()
    (tmp_path / ".tmp-model.keras").write_text("torn")
    lines = run_files.listing(str(tmp_path))
    names = [line.split()[0] for line in lines]
    assert names == ["report.html", "metrics.json", "heads/", "model_int8.tflite",
                     "zzz.txt"]
    assert lines[-1].endswith("(not written by this tool)")
    assert "--quantize=int8" in lines[3]  # the placeholder filled from the name


def test_the_audit_line_says_none_found_and_never_an_empty_count():
    none = summary.audit_line({"suspect_labels": 0, "duplicate_pairs": 0,
                               "by": "linear probe, out-of-fold", "training_images": 40,
                               "duplicates_looked_for": "exact copies and near-duplicates"})
    assert "labels that look wrong: none found" in none
    assert "duplicates across the splits: none found" in none
    some = summary.audit_line({"suspect_labels": 3, "duplicate_pairs": 1,
                               "training_images": 40})
    assert "3 of 40 training labels look wrong" in some and "1 duplicate pair" in some


def test_the_report_names_the_images_each_choice_was_made_on(tmp_path):
    """Without CV the probe and the scenario are compared on the validation images (which
    also chose the scenario): the report says so and claims no out-of-fold comparison, no
    cross-validation curve and no spread it did not measure."""
    run = outputs.RunFolder(str(tmp_path))
    (tmp_path / "heads_comparison.png").write_bytes(b"\x89PNG\r\n")  # its caption is read
    versus = {"baseline": 0.92, "candidate": 0.97, "difference": 0.05, "ci90": [0.02, 0.08],
              "images": 115, "candidate_better_beyond_noise": True, "kept": "the linear probe",
              "baseline_is": "scenario A", "candidate_is": "the linear probe",
              "on": "the validation images, which also chose the scenario and its epoch"}
    run.update_metrics("heads", {"A": {"best_val_accuracy": 0.92, "epoch": 5}})
    run.update_metrics("heads_choice", {"scenario": "probe", "metric": "accuracy",
                                        "by": "validation-image comparison",
                                        "probe_vs_head": versus})
    run.update_metrics("export", {"default": "model.keras", "tta": 1, "estimate": {
        "metric": "accuracy", "value": 0.97, "how": "validation set (115 images)"}})
    page = open(report.write_run_report(str(tmp_path))).read()
    assert "best scenario vs the linear probe (the validation images)" in page
    assert "out-of-fold" not in page and "cross-validation mean" not in page
    assert "Scenarios per epoch on the validation images" in page
    assert re.search(r"Expected accuracy: <span[^>]*>0.9700</span> \(validation set", page)
    assert "± –" not in page
    run.update_metrics("cross_validation", {"A": {"auc_mean": 0.9}})
    run.update_metrics("heads_choice", {"probe_vs_head": {
        **versus, "on": "out-of-fold predictions of the training split, fold by fold"}})
    page = open(report.write_run_report(str(tmp_path))).read()
    assert "best scenario vs the linear probe (out-of-fold predictions of the training " \
           "split)" in page and "cross-validation mean" in page


def test_each_file_gets_its_most_specific_role_and_old_predictions_are_marked(tmp_path):
    """x_unfamiliar.png is predict.py's unfamiliar gallery, not one of its score plots; a
    prediction written before the current model.keras (e.g. before --stage=finetune
    exported another model) is marked, never deleted."""
    import os
    assert run_files.role("held_unfamiliar.png") == "predict.py: the most unfamiliar photos"
    assert run_files.role("held_roc.png") == \
        "predict.py --labels: ROC, confusion matrix, top losses"
    assert run_files.role("held_unfamiliar.csv").startswith("predict.py, Kaggle layout")
    for name in ("held.csv", "model.keras", "fresh.csv"):
        (tmp_path / name).write_text("x")
    os.utime(tmp_path / "held.csv", (1_000_000, 1_000_000))
    os.utime(tmp_path / "model.keras", (2_000_000, 2_000_000))
    os.utime(tmp_path / "fresh.csv", (3_000_000, 3_000_000))
    lines = {line.split()[0]: line for line in run_files.listing(str(tmp_path))}
    assert "made by an earlier model.keras" in lines["held.csv"]
    assert "earlier" not in lines["fresh.csv"] and "earlier" not in lines["model.keras"]
    assert (tmp_path / "held.csv").exists()


def test_the_whole_networks_flags_are_named_when_it_was_not_tried(tmp_path):
    job = _job(tmp_path)
    state_lib.update(str(tmp_path), export=state_lib.ExportState("model.keras"))
    job.run.update_metrics("whole_network", {"tried": False, "why": "vgg16's conv base has "
                                             "14.7 M parameters: tried by default only ..."})
    found = no_effect.find(job, ("whole_epochs", "augment"), "probe", 5)
    assert found["--whole_epochs"] == ("whole-network fine-tuning was not tried: vgg16's conv "
                                       "base has 14.7 M parameters")
    # Tried (and lost to the probe): --augment shaped it, so it is not named.
    job.run.update_metrics("whole_network", {"tried": True, "why": "..."})
    assert set(no_effect.find(job, ("whole_epochs", "augment", "finetune_epochs"), "probe",
                              5)) == {"--finetune_epochs"}
