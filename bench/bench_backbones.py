"""Backbones against this CPU's limit: extraction speed, size and exported latency.

For each backbone (``--backbones``, names or .keras files; ``--weights`` for VGG16):

  * FLOPs per image of the frozen layers the cache holds (2 x multiply-adds of every
    convolution, depthwise convolution and dense layer, counted from the built model);
  * extraction images per second: the bare feature model on one in-memory batch of
    real photos (``--data_dir``), after a warm-up, and as a fraction of the float32
    matmul rate measured in the same run (FLOPs x images/s / matmul FLOP/s);
  * parameters, ``model.keras`` size, and the ONNX export's size and latency per image
    (batch 16, onnxruntime on CPU) with its max |dP| against the Keras model.

  W=$(python ../shared/tools/vgg16_pretrained.py)
  L=$(python ../shared/tools/efficientnet_lite_pretrained.py)
  python bench/bench_backbones.py --data_dir=../shared/data/hymenoptera/train \\
      --weights="$W" --backbones=vgg16,"$L"
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def macs(model, input_shape, only=None) -> int:
    """Multiply-adds of one image of ``input_shape`` through ``model``: a file's network
    may take any size, so its layers' output shapes come from one forward pass."""
    import keras
    inner = [l for l in model.layers if isinstance(l, keras.Model)]
    if inner:  # the stem wraps the base network (after CaffeToRGB); the last stage too
        return sum(macs(m, input_shape) for m in inner)
    counted = [l for l in model.layers
               if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                 keras.layers.Dense)) and (only is None or l.name in only)]
    if not counted:
        return 0
    static = [l.output.shape for l in counted]
    if all(d is not None for shape in static for d in shape[1:]):
        outputs = [np.zeros((1, *shape[1:])) for shape in static]  # VGG16: fixed sizes
    else:
        probe = keras.Model(model.inputs, [l.output for l in counted])
        outputs = probe(np.zeros((1, *input_shape), np.float32))
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    total = 0
    for layer, out in zip(counted, outputs):
        shape = out.shape[1:]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            total += int(np.prod(shape) * np.prod(layer.kernel_size))
        elif isinstance(layer, keras.layers.Conv2D):
            total += int(np.prod(shape) * np.prod(layer.kernel_size) * layer.kernel.shape[2])
        else:
            total += int(layer.kernel.shape[0] * layer.kernel.shape[1])
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--backbones", default="vgg16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--onnx", action="store_true", default=True)
    parser.add_argument("--noonnx", dest="onnx", action="store_false")
    args = parser.parse_args()
    from bench_perf import matmul_rates
    from small_photo_classifier.features import networks
    from small_photo_classifier.pipeline import discovery, input as input_lib
    frame = discovery.discover(args.data_dir).frame
    paths = frame.path.tolist()[:args.batch]
    batch = next(iter(input_lib.eval_dataset(paths, None, paths, args.image_size,
                                             len(paths))))["image"].numpy()
    peak = matmul_rates(seconds=3.0)["float32"]
    print(f"# backbones at {args.image_size} px, batch {len(paths)} real photos; float32 "
          f"2048^2 matmul {peak:.0f} GFLOP/s on this machine")
    print("| backbone | GFLOPs/image (frozen part) | images/s | fraction of matmul rate | "
          "parameters | model.keras MB | ONNX MB | ONNX ms/image | ONNX max abs dP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.backbones.split(","):
        print(_row(args, networks.check_choice(name), batch, peak), flush=True)


def _gflops(clf, choice, size) -> float:
    """FLOPs per image (in G) of the frozen layers the cache holds."""
    import keras
    if choice.is_file:  # any input size: count on the file's own graph, to the feature map
        from small_photo_classifier.features import zoo
        whole = zoo.load_file(choice.name)
        names = [l.name for l in whole.layers]
        upto = keras.Model(whole.input, whole.get_layer(clf.net.feature_layer).output)
        return 2 * macs(upto, size, names[:names.index(clf.net.feature_layer) + 1]) / 1e9
    return 2 * (macs(clf.stem, size) + macs(clf.last, tuple(clf.last.input.shape[1:]))) / 1e9


def _row(args, choice, batch, peak) -> str:
    """One backbone's table row: FLOPs, speed (best of three), size, its ONNX export."""
    from small_photo_classifier.features import backbone
    from small_photo_classifier.workflow.use import deploy, runtimes
    weights = "imagenet" if choice.is_file else args.weights
    clf = backbone.build_classifier(weights, False, args.image_size, 0, backbone=choice)
    feature = clf.feature_model([clf.net.feature_layer])
    gflops = _gflops(clf, choice, (args.image_size, args.image_size, 3))
    feature(batch[:4], training=False)
    best = np.inf
    for _ in range(3):
        started = time.perf_counter()
        feature(batch, training=False)
        best = min(best, time.perf_counter() - started)
    per_s = len(batch) / best
    with tempfile.TemporaryDirectory() as folder:
        clf.model.save(os.path.join(folder, "model.keras"))
        megabytes = os.path.getsize(os.path.join(folder, "model.keras")) / 1e6
        onnx = ("-", "-", "-")
        if args.onnx:
            path = deploy.convert(clf.model, "onnx", folder)
            out, _, per_image = runtimes.run_format("onnx", path, batch)
            dp = float(np.max(np.abs(out["probabilities"]
                                     - np.asarray(clf.model(batch), np.float64))))
            onnx = (f"{os.path.getsize(path) / 1e6:.1f}", f"{1000 * per_image:.1f}",
                    f"{dp:.1e}")
    return (f"| {clf.net.slug} | {gflops:.2f} | {per_s:.1f} | {gflops * per_s / peak:.2f} | "
            f"{clf.model.count_params() / 1e6:.1f} M | {megabytes:.1f} | {onnx[0]} | {onnx[1]} | "
            f"{onnx[2]} |")


if __name__ == "__main__":
    main()
