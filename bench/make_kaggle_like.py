"""A Kaggle-sized SYNTHETIC folder for timing whole jobs: 2,295 training and 1,531 test
JPEGs at 1154 x 866 px (the Invasive Species Monitoring photos' size), the Kaggle layout
(``train/``, ``train_labels.csv`` with ``name,invasive``, ``test/``,
``sample_submission.csv``). The pictures are the demo's foliage (`pipeline.demo`), drawn
at 288 px and upscaled: what they show says nothing about accuracy; their size and count
are what a timing needs.

    python bench/make_kaggle_like.py --out=/tmp/kaggle_like
    python train.py --data_dir=/tmp/kaggle_like --backbone=... --finetune_epochs=5
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=2295)
    parser.add_argument("--test", type=int, default=1531)
    parser.add_argument("--width", type=int, default=1154)
    parser.add_argument("--height", type=int, default=866)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import tensorflow as tf
    from small_photo_classifier.pipeline import demo
    rng = np.random.default_rng(args.seed)
    for subset, count in (("train", args.train), ("test", args.test)):
        folder = os.path.join(args.out, subset)
        os.makedirs(folder, exist_ok=True)
        labels = rng.integers(0, 2, count)
        for i, label in enumerate(labels, start=1):
            small = demo.synth_image(rng, 288, bool(label))
            big = tf.image.resize(small[None].astype(np.float32), [args.height, args.width])
            data = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(big[0], 0, 255), tf.uint8),
                                     quality=90)
            tf.io.write_file(os.path.join(folder, f"{i}.jpg"), data)
        names = "\n".join(f"{i},{int(v)}" for i, v in enumerate(labels, start=1))
        csv = "train_labels.csv" if subset == "train" else "sample_submission.csv"
        with open(os.path.join(args.out, csv), "w", encoding="utf-8") as f:
            f.write("name,invasive\n" + (names if subset == "train" else "\n".join(
                f"{i},0.5" for i in range(1, count + 1))) + "\n")
        print(f"{subset}: {count} photos at {args.width}x{args.height} in {folder}")


if __name__ == "__main__":
    main()
