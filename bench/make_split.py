"""Splits a class-folder photo set into a training part and a held-out fifth, as symlinks.

The benchmarks' held-out photos are seen by nothing but predict.py: a stratified split
(scikit-learn's StratifiedShuffleSplit, seed 0 by default) of each class folder into
``<out>/train/<class>/`` and ``<out>/heldout/<class>/``, each photo a symlink to the
original (nothing is copied). Files that are not photos (the ants/bees GIF) stay out.

    python bench/make_split.py --data_dir=../shared/data/seedlings12/train --out=/tmp/sd_split
"""

import argparse
import os
import shutil

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit

PHOTOS = (".jpg", ".jpeg", ".png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="a folder of class folders")
    parser.add_argument("--out", required=True)
    parser.add_argument("--heldout", type=float, default=0.2, help="share held out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    classes = sorted(d for d in os.listdir(args.data_dir)
                     if os.path.isdir(os.path.join(args.data_dir, d)))
    paths, labels = [], []
    for k, name in enumerate(classes):
        folder = os.path.join(args.data_dir, name)
        for f in sorted(os.listdir(folder)):
            if f.lower().endswith(PHOTOS):
                paths.append(os.path.abspath(os.path.join(folder, f)))
                labels.append(k)
    labels = np.asarray(labels)
    splitter = StratifiedShuffleSplit(1, test_size=args.heldout, random_state=args.seed)
    train, held = next(splitter.split(np.zeros(len(labels)), labels))
    for part, rows in (("train", train), ("heldout", held)):
        shutil.rmtree(os.path.join(args.out, part), ignore_errors=True)
        for i in rows:
            folder = os.path.join(args.out, part, classes[labels[i]])
            os.makedirs(folder, exist_ok=True)
            os.symlink(paths[i], os.path.join(folder, os.path.basename(paths[i])))
    print(f"{args.out}: train {len(train)}, heldout {len(held)} photos of {len(classes)} "
          f"classes (seed {args.seed})")


if __name__ == "__main__":
    main()
