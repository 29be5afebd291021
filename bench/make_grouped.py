"""A grouped photo set for issue 48's leakage benchmark: K augmented copies of every photo
of a split made by bench/make_split.py (a random crop of 80-95 % of each side, a mirror
on every other copy), named ``<photo>_<k>.jpg``, so that the copies of one photo are a
group (``--group_pattern='^(.*)_\\d$'``). The held-out part gets the copies of its own
photos only: no photo has copies on both sides.

    python bench/make_grouped.py --split=/tmp/fl_split --out=/tmp/fl_grouped --copies=4
"""

import argparse
import os

import numpy as np
from PIL import Image


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", required=True, help="make_split.py's folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    made = {}
    for part in ("train", "heldout"):
        root = os.path.join(args.split, part)
        for label in sorted(os.listdir(root)):
            folder = os.path.join(args.out, part, label)
            os.makedirs(folder, exist_ok=True)
            for name in sorted(os.listdir(os.path.join(root, label))):
                photo = Image.open(os.path.join(root, label, name)).convert("RGB")
                w, h = photo.size
                stem = os.path.splitext(name)[0]
                for k in range(args.copies):
                    fw, fh = rng.uniform(0.80, 0.95, 2)
                    cw, ch = int(w * fw), int(h * fh)
                    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
                    copy = photo.crop((x, y, x + cw, y + ch))
                    if k % 2:
                        copy = copy.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    copy.save(os.path.join(folder, f"{stem}_{k}.jpg"), quality=92)
                    made[part] = made.get(part, 0) + 1
    print(f"{args.out}: " + ", ".join(f"{part} {n} copies" for part, n in made.items())
          + f" ({args.copies} of each photo)")


if __name__ == "__main__":
    main()
