"""The run state (workflow.base.state): typed, versioned, written per stage, read by the next."""

import json

import pytest

from small_photo_classifier.pipeline.errors import ConfigError
from small_photo_classifier.workflow.base import state


def test_each_stage_writes_its_part_and_the_rest_is_kept(tmp_path):
    probe = state.ProbeState("max", False, 0.01, 0.98, 0.97, 0.01)
    state.update(str(tmp_path), probe=probe, heads={"B": state.HeadState(3, 1e-4, views=2)},
                 choice="B", choice_by="cross-validation")
    state.update(str(tmp_path), export=state.ExportState("bag.keras", 2, True, {"value": 0.9}))
    loaded = state.load(str(tmp_path))
    assert loaded.probe == probe and loaded.heads["B"].views == 2
    assert loaded.heads["B"].score is None  # neither CV nor validation recorded
    assert (loaded.choice, loaded.export.default, loaded.export.tta) == ("B", "bag.keras", 2)
    data = json.loads((tmp_path / state.STATE_FILE).read_text())
    assert data["version"] == state.SCHEMA_VERSION
    with pytest.raises(AttributeError):
        state.update(str(tmp_path), nonsense=1)


def test_metrics_json_is_never_read_once_the_state_exists(tmp_path):
    state.update(str(tmp_path), choice="A", choice_by="cross-validation")
    # A report renamed or rewritten by hand changes nothing a later stage decides.
    (tmp_path / "metrics.json").write_text(json.dumps({"heads_choice": {"scenario": "C"}}))
    assert state.load(str(tmp_path)).choice == "A"


def test_a_run_folder_from_before_the_state_is_converted_from_its_metrics(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({
        "probe": {"pooling": "average", "standardised": True, "C": 0.1, "val_auc": 0.95,
                  "cv_auc_mean": 0.96, "cv_auc_std": 0.02},
        "heads": {"B": {"epoch": 4, "best_val_auc": 0.97, "cv_auc_mean": 0.975,
                        "cv_auc_std": 0.01, "learning_rate": 1e-4, "optimizer": "sgd",
                        "dropout": 0.5, "views": 2}},
        "heads_choice": {"scenario": "B", "by": "cross-validation"},
        "export": {"default": "model.keras", "tta": 2, "refit": True,
                   "estimate": {"value": 0.975}}}))
    old = state.load(str(tmp_path))
    assert old.probe == state.ProbeState("average", True, 0.1, 0.95, 0.96, 0.02)
    assert old.heads["B"] == state.HeadState(4, 1e-4, "sgd", 0.5, 2, 0.97, 0.975, 0.01)
    assert old.heads["B"].score == 0.975 and old.choice == "B"
    assert old.export == state.ExportState("model.keras", 2, True, {"value": 0.975})
    assert state.load(str(tmp_path / "new")) == state.RunState()  # nothing yet


def test_a_state_of_another_schema_or_damaged_is_a_clear_error(tmp_path):
    (tmp_path / state.STATE_FILE).write_text(json.dumps({"version": 99}))
    with pytest.raises(ConfigError, match="schema version 99"):
        state.load(str(tmp_path))
    (tmp_path / state.STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="rerun --stage=heads"):
        state.load(str(tmp_path))
