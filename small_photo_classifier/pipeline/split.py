"""The train/validation split: stratified, seeded, the same on any machine.

Single-label data is split class by class; multi-label data by iterative
stratification (Sechidis, Tsoumakas and Vlahavas, 2011), which keeps every
label's share about equal on both sides. Every class keeps at least one image
on each side. With groups (`pipeline.groups`: a ``group`` column), whole groups are
dealt instead of photos, so the counts are met as closely as whole groups allow.
"""

import dataclasses
from typing import Sequence, Union

import numpy as np
import pandas as pd

from small_photo_classifier.pipeline.errors import ConfigError
from small_photo_classifier.pipeline.groups import COLUMN as GROUP


@dataclasses.dataclass(frozen=True)
class Balanced:
    """``--val_size=100+100``: the same count of validation images from each class (the
    reference write-up's 100/100), asked for explicitly. Every other size keeps each
    class's share of the data, so that what is measured and fitted on the validation
    images (calibration, thresholds, the expected score) sees the field's proportions."""
    per_class: int
    classes: int

    def __str__(self) -> str:
        return "+".join([str(self.per_class)] * self.classes)


def _apportion(count: int, sizes: dict, even: bool) -> dict:
    """How many images of each class go to validation: in proportion to the classes'
    sizes (largest remainder keeps the total exact), with at least one image of every
    class; ``count / K`` each when ``even`` and every class allows it."""
    k, n = len(sizes), sum(sizes.values())
    if even and count % k == 0 and all(c >= 2 * (count // k) for c in sizes.values()):
        return {label: count // k for label in sizes}
    exact = {label: count * c / n for label, c in sizes.items()}
    share = {label: int(np.floor(v)) for label, v in exact.items()}
    order = sorted(exact, key=lambda label: exact[label] - share[label], reverse=True)
    for label in order[:count - sum(share.values())]:
        share[label] += 1
    # A class with no validation image cannot be scored: take one from the largest share.
    for label in [lab for lab, v in share.items() if v == 0 and sizes[lab] >= 2]:
        donor = max(share, key=lambda lab: (share[lab], -sizes[lab]))
        if share[donor] > 1:
            share[donor] -= 1
            share[label] = 1
    return share


def _count(val_size: Union[int, float, Balanced], n: int) -> int:
    if isinstance(val_size, Balanced):
        return val_size.per_class * val_size.classes
    if isinstance(val_size, float):
        if not 0 < val_size < 1:
            raise ConfigError(f"--val_size as a fraction must be in (0, 1); got {val_size}.")
        count = int(round(val_size * n))
    else:
        count = int(val_size)
    if count < 2 or count > n // 2:
        raise ConfigError(
            f"--val_size={val_size} gives {count} validation images out of {n}, leaving "
            f"{n - count} for training; use a count between 2 and {n // 2} or a fraction "
            "such as --val_size=0.2.")
    return count


def split_train_val(frame: pd.DataFrame, val_size: Union[int, float, Balanced], seed: int):
    """Stratified, seeded split of labelled images into train and validation.

    Args:
      frame: columns ``name`` and ``label`` (an int per image, or a 0/1 tuple per image
        for multi-label data).
      val_size: an integer count or a fraction in (0, 1): each class contributes in
        proportion to its share of the data (largest remainders keep the count exact;
        at least one image of every class); or `Balanced` (``100+100``): that many of
        each class, and a class that cannot give them while keeping one for training
        is an error, never a silent change of proportions.
      seed: the same seed gives the same split on any machine (NumPy's PCG64 on
        names sorted in a fixed order).

    Returns:
      (train, val) frames, each sorted by name. With a ``group`` column
      (`pipeline.groups`), no group has photos on both sides.

    Raises:
      ConfigError: if the validation set would be empty or take every image of a class.
    """
    count = _count(val_size, len(frame))
    if len(frame) and isinstance(frame.label.iloc[0], tuple):
        if isinstance(val_size, Balanced):
            raise ConfigError(f"--val_size={val_size} balances classes; with several labels "
                              "per image the split keeps each label's share: pass a count "
                              "or a fraction.")
        return _split_multilabel(frame, count, seed)
    sizes = frame.label.value_counts().sort_index().to_dict()
    per_class = _per_class(val_size, count, sizes)
    if GROUP in frame.columns:
        return _split_groups(frame, per_class, seed)
    rng = np.random.default_rng(seed)
    val_names = []
    for label in sorted(per_class):
        names = np.sort(frame.name[frame.label == label].to_numpy(dtype=str))
        val_names.extend(names[rng.permutation(len(names))[:per_class[label]]])
    return _sides(frame, set(val_names))


def _per_class(val_size, count: int, sizes: dict) -> dict:
    """Validation images of each class (checked: at least one on each side)."""
    if isinstance(val_size, Balanced):
        if val_size.classes != len(sizes):
            raise ConfigError(f"--val_size={val_size} names {val_size.classes} classes' "
                              f"validation images; the data has {len(sizes)} classes.")
        per_class = {label: val_size.per_class for label in sizes}
    else:
        per_class = _apportion(count, sizes, even=False)
    for label, k in per_class.items():
        if k < 1 or k >= sizes[label]:
            raise ConfigError(
                f"--val_size={val_size} would put {k} of the {sizes[label]} images of class "
                f"{label} in validation; each class needs at least one image on both sides.")
    return per_class


def _split_groups(frame: pd.DataFrame, per_class: dict, seed: int):
    """Whole groups to validation, class by class (a group counts for its most common
    class): in a seeded order, each group that fits in what is left of the class's
    count, and the class's smallest group when none fits (every class gets validation
    images). A class whose photos are all in one group cannot be on both sides, and
    says so."""
    rng = np.random.default_rng(seed)
    table = frame.groupby(GROUP).label.agg(lambda v: v.value_counts().index[0])
    size = frame.groupby(GROUP).size()
    val_groups = []
    for label in sorted(per_class):
        groups = np.sort(table.index[table == label].to_numpy(dtype=str))
        if len(groups) < 2:
            raise ConfigError(
                f"Class {label}: its photos are in {len(groups)} group(s), and a group stays "
                "on one side of the split, so the class cannot be both trained on and "
                "validated. Name finer groups, or give the class photos of more groups.")
        taken, chosen = 0, []
        for group in groups[rng.permutation(len(groups))]:
            if taken + size[group] <= per_class[label] and len(chosen) < len(groups) - 1:
                chosen.append(group)
                taken += int(size[group])
        val_groups += chosen or [min(groups, key=lambda g: (size[g], g))]
    train, val = _sides(frame, set(frame.name[frame[GROUP].isin(val_groups)]))
    missing = [label for label in per_class if not ((train.label == label).any()
                                                     and (val.label == label).any())]
    if missing:
        raise ConfigError(f"Keeping groups whole leaves class(es) {missing} on one side of "
                          "the split only (their photos share groups with other classes'): "
                          "name finer groups, or give those classes photos of more groups.")
    return train, val


def _sides(frame: pd.DataFrame, val_names: set):
    is_val = frame.name.isin(val_names)
    train = frame[~is_val].sort_values("name").reset_index(drop=True)
    val = frame[is_val].sort_values("name").reset_index(drop=True)
    return train, val


def _split_multilabel(frame: pd.DataFrame, count: int, seed: int):
    if GROUP in frame.columns:  # iterative stratification of whole groups
        labels = frame.groupby(GROUP).label.agg(lambda v: tuple(np.max(list(v), axis=0)))
        names = labels.index.to_numpy(dtype=str)
        k = int(round(count * len(names) / len(frame)))
        if not 1 <= k < len(names):
            raise ConfigError(f"{len(names)} groups cannot give about {count} validation "
                              "images and keep groups whole: name finer groups.")
        side = iterative_assign(np.asarray(labels.tolist(), int), [len(names) - k, k], seed)
        return _sides(frame, set(frame.name[frame[GROUP].isin(set(names[side == 1]))]))
    order = np.argsort(frame.name.to_numpy(dtype=str), kind="stable")
    y = np.asarray(frame.label.tolist(), int)[order]
    side = iterative_assign(y, [len(y) - count, count], seed)
    names = frame.name.to_numpy(dtype=str)[order]
    return _sides(frame, set(names[side == 1]))


def iterative_assign(y, sizes: Sequence[int], seed: int) -> np.ndarray:
    """Iterative stratification: the part (0..len(sizes)-1) of each row of a 0/1 label
    matrix ``y``, the parts of exactly the given sizes, each label shared between them in
    about proportion. Repeatedly takes the label with the fewest unassigned rows and deals its
    rows to the parts that most need that label; rows without labels go last."""
    y = np.asarray(y).astype(int)
    n = len(y)
    rng = np.random.default_rng(seed)
    want = np.asarray(sizes, float)
    want_label = np.outer(want / max(n, 1), y.sum(axis=0))
    part = np.full(n, -1)
    left = np.ones(n, bool)
    while left.any():
        counts = y[left].sum(axis=0)
        label = int(np.argmin(np.where(counts > 0, counts, np.inf))) if counts.any() else None
        rows = np.flatnonzero(left & (y[:, label] == 1)) if label is not None \
            else np.flatnonzero(left)
        for row in rng.permutation(rows):
            need = (want_label[:, label] if label is not None else want).copy()
            need[want <= 0] = -np.inf  # a full part takes no more rows (while others have room)
            if not np.isfinite(need).any():
                need = want_label[:, label] if label is not None else want.copy()
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:
                best = best[want[best] == want[best].max()]
            chosen = int(rng.choice(best))
            part[row], left[row] = chosen, False
            want[chosen] -= 1
            want_label[chosen] -= y[row]
    return part
