"""Photo sets for issue 48's calibration and prior benchmarks, from a class-folder set:
a held-out part and two training parts, one balanced and one with a rare class kept at
1 photo in ``--every`` (the held-out part too, so that it is drawn like the imbalanced
field). ``--rare`` names the rare class; with ``--merge`` the named folders become one
class ``rare`` and every other folder one class ``common`` (a two-class set large
enough for >= 200 held-out photos from flowers12).

    python bench/make_imbalanced.py --data_dir=../shared/data/hymenoptera/train \
        --out=/tmp/ab_imb --rare=bees --every=4 --heldout=0.2
    python bench/make_imbalanced.py --data_dir=../shared/data/flowers12/train \
        --out=/tmp/fl_imb --merge --rare=iris,lily-valley,pansy,sunflower,tigerlily,windflower \
        --every=4 --heldout=0.5

Writes ``OUT/train_balanced``, ``OUT/train`` (imbalanced) and ``OUT/heldout``
(imbalanced), each ``<class>/<photo>`` (copies; nothing of the source is changed).
"""

import argparse
import os
import shutil

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="class-folder photo set")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rare", required=True, help="the rare class (--merge: folders, ',')")
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--every", type=int, default=4, help="keep 1 rare photo in this many")
    parser.add_argument("--heldout", type=float, default=0.2, help="share of each folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rare = set(args.rare.split(","))
    counts = {}
    for folder in sorted(os.listdir(args.data_dir)):
        label = ("rare" if folder in rare else "common") if args.merge else folder
        names = sorted(os.listdir(os.path.join(args.data_dir, folder)))
        names = [names[i] for i in rng.permutation(len(names))]
        cut = int(round(len(names) * args.heldout))
        parts = {"heldout": names[:cut], "train_balanced": names[cut:]}
        is_rare = folder in rare
        # The rare class's imbalanced parts: 1 photo in --every of its balanced ones.
        parts["train"] = parts["train_balanced"][::args.every] if is_rare else parts["train_balanced"]
        if is_rare:
            parts["heldout"] = parts["heldout"][::args.every]
        for part, chosen in parts.items():
            target = os.path.join(args.out, part, label)
            os.makedirs(target, exist_ok=True)
            for name in chosen:
                shutil.copy(os.path.join(args.data_dir, folder, name),
                            os.path.join(target, f"{folder}_{name}" if args.merge else name))
            counts[(part, label)] = counts.get((part, label), 0) + len(chosen)
    for (part, label), n in sorted(counts.items()):
        print(f"{part:15s} {label:12s} {n}")


if __name__ == "__main__":
    main()
