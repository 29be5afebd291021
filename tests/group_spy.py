"""Runs train.py with every splitter of the tool watched (tests/test_groups.py): each call
of the validation split, the CV folds and the validation parts is checked for a group
on both sides, and recorded (with the function that asked for it) in $GROUP_SPY_LOG.

    python tests/group_spy.py <train.py flags>
"""

import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from small_photo_classifier.features.choose import cv, honest  # noqa: E402
from small_photo_classifier.pipeline import split  # noqa: E402


def _record(kind: str, pure: bool, grouped: bool) -> None:
    callers = [f.name for f in traceback.extract_stack()[:-2]
               if f.filename.startswith(ROOT) and "group_spy" not in f.filename]
    with open(os.environ["GROUP_SPY_LOG"], "a") as log:
        log.write(json.dumps({"kind": kind, "pure": pure, "grouped": grouped,
                              "callers": callers}) + "\n")


def _pure(groups, sides) -> bool:
    seen = [set(groups[side]) for side in sides]
    return all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])


real_folds, real_split, real_parts = cv.make_folds, split.split_train_val, honest.parts


def make_folds(y, folds, seed, task=None, groups=None):
    out = real_folds(y, folds, seed, task, groups)
    import numpy as np
    _record("folds", groups is None or all(_pure(np.asarray(groups), pair) for pair in out),
            groups is not None)
    return out


def split_train_val(frame, val_size, seed):
    train, val = real_split(frame, val_size, seed)
    grouped = "group" in frame.columns
    _record("split", not grouped or not set(train.group) & set(val.group), grouped)
    return train, val


def parts(task, y, seed=0, k=honest.PARTS, groups=None):
    out = real_parts(task, y, seed, k, groups)
    import numpy as np
    _record("parts", groups is None or _pure(np.asarray(groups), out), groups is not None)
    return out


cv.make_folds, split.split_train_val, honest.parts = make_folds, split_train_val, parts
sys.argv = [os.path.join(ROOT, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
