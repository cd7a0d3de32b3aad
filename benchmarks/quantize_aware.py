"""Quantization-aware training: float, post-training int8 and quantize-aware int8, measured in LiteRT.

Models trained on the digits (no download), each on five splits:
- a small convnet (8x8 digits), where post-training quantization already does well;
- a MobileNet-style network of depthwise-separable blocks (16x16 digits) whose
  depthwise outputs have wide per-channel ranges. In trained MobileNets the
  channels of one tensor differ in range by up to two orders of magnitude
  (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
  Bias Correction", section 3), and int8 rounds them all to one per-tensor
  scale. Here each channel of each depthwise output is scaled by a factor
  between 1/4 and 4 (ranges up to 16x apart), and in a third case between
  1/10 and 10 (up to 100x), and the next 1x1 convolution divides it back,
  which leaves the float model's function unchanged (ReLU commutes with a
  positive scale; checked below) and reproduces that spread.

For each: the float model (trained 20 epochs, statistics recalibrated); its
post-training int8 export (`bnseq.export(quantize="int8", data=...)`,
calibrated on the training split); and `bnseq.quantize_aware` trained from it
for 6 epochs at a hundredth of the float learning rate (Adam), the recalibrated
statistics frozen from the first step (`freeze_statistics_after=0`), exported
with no data. Accuracy is the LiteRT interpreter's on the test
split; sizes are the `.tflite` files; latency is LiteRT's on a batch of 32
(one thread), interleaved; the cost of training is seconds per epoch of
`fit`, float and quantize-aware epochs interleaved (after compiling).
"""

import os
import tempfile

import keras
import numpy as np
from keras import layers

import bnseq
from benchmarks import common
from bnseq import demo
from bnseq.exporting import runtimes

FLOAT_EPOCHS, QAT_EPOCHS = 20, 6


def digits(size, seed):
    """The demo's split of the digits, as `size` x `size` x 1 images."""
    x_train, x_test, y_train, y_test = demo.load_data(seed=seed)

    def images(x):
        repeat = size // 8
        return np.ascontiguousarray(x.reshape(-1, 8, 8, 1).repeat(repeat, 1).repeat(repeat, 2))

    return images(x_train), images(x_test), y_train, y_test


def convnet():
    return bnseq.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10, activation="softmax"),
        ],
        batch_norm=True,
    )


def mobilenet(width=16):
    model = bnseq.Sequential(
        [keras.Input((16, 16, 1)), layers.Conv2D(width, 3, strides=2, padding="same", activation="relu")],
        batch_norm=True,
    )
    for filters, stride in ((2 * width, 1), (2 * width, 2), (4 * width, 1), (4 * width, 1)):
        model.add(layers.DepthwiseConv2D(3, strides=stride, padding="same", activation="relu"))
        model.add(layers.Conv2D(filters, 1, activation="relu"))
    model.add(layers.GlobalAveragePooling2D())
    model.add(layers.Dense(10, activation="softmax"), batch_norm=False)
    return model


def spread_channels(model, factor, seed):
    """Each depthwise output channel scaled by a factor in [1/factor, factor], the next 1x1 conv dividing it back."""
    rng = np.random.default_rng(seed)
    found = model.layers
    for index, layer in enumerate(found):
        if not isinstance(layer, layers.DepthwiseConv2D):
            continue
        bn = found[index + 1]
        pointwise = next(each for each in found[index + 1:] if isinstance(each, layers.Conv2D))
        scale = np.exp(rng.uniform(-np.log(factor), np.log(factor), size=bn.gamma.shape)).astype("float32")
        gamma, beta, mean, variance = bn.get_weights()
        bn.set_weights([gamma * scale, beta * scale, mean, variance])
        kernel = pointwise.get_weights()
        kernel[0] = kernel[0] / scale[None, None, :, None]
        pointwise.set_weights(kernel)


CASES = {
    "digits convnet": (convnet, 8, None),
    "MobileNet-style, channel ranges up to 16x apart": (mobilenet, 16, 4.0),
    "MobileNet-style, channel ranges up to 100x apart": (mobilenet, 16, 10.0),
}


def accuracy(path, x, y):
    run = runtimes.run_litert(path, ["x"], 1)
    ((_, probabilities),) = runtimes.in_batches(run, [x])
    return float(np.mean(np.argmax(probabilities, -1) == y))


def measure(name, seed, quick, folder):
    """One row: the three accuracies in LiteRT, sizes, latencies and the cost of an epoch."""
    build, size, factor = CASES[name]
    x_train, x_test, y_train, y_test = digits(size, seed)
    keras.utils.set_random_seed(seed)
    model = build()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=1 if quick else FLOAT_EPOCHS, batch_size=32, verbose=0)
    bnseq.recalibrate(model, x_train, verbose=0)
    if factor is not None:
        before = bnseq.probes.predicted(model, x_test)
        spread_channels(model, factor, seed)
        after = bnseq.probes.predicted(model, x_test)
        assert np.max(np.abs(after - before)) < 1e-4, "spreading the channels changed the float model"
    paths = {kind: os.path.join(folder, f"{seed}_{kind}.tflite") for kind in ("float", "ptq", "qat")}
    bnseq.export(model, paths["float"], sample=x_test[:32])
    bnseq.export(model, paths["ptq"], quantize="int8", data=x_train, min_agreement=0.0, rtol=np.inf)
    epochs = 1 if quick else QAT_EPOCHS
    qat = bnseq.quantize_aware(model, freeze_statistics_after=0)
    qat.compile(keras.optimizers.Adam(3e-5), "sparse_categorical_crossentropy")
    qat.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    report = bnseq.export(qat, paths["qat"], data=x_test, min_agreement=0.0, rtol=np.inf)
    accuracies = {kind: accuracy(path, x_test, y_test) for kind, path in paths.items()}
    batch = x_test[:32]
    runs = {kind: runtimes.run_litert(path, ["x"], 1) for kind, path in paths.items()}
    latency = common.interleaved({kind: (lambda run=run: run([batch])) for kind, run in runs.items()},
                                 rounds=3 if quick else 15, calls=5)
    # The cost of training: one epoch of each, interleaved, on models already compiled and trained.
    epoch = common.interleaved(
        {"float": lambda: model.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0),
         "quantize-aware": lambda: qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0)},
        rounds=1 if quick else 5, warmup=0,
    )
    return {
        "accuracy": accuracies, "examples": len(y_test), "size": {k: os.path.getsize(p) for k, p in paths.items()},
        "latency": latency, "epoch": epoch, "agreement": report.quantization.agreement,
        "steps": report.quantization.steps, "float operators": report.quantization.float_operators,
    }


def run(quick=False):
    try:  # every figure is LiteRT's (the litert extra)
        runtimes.runtime("litert")
    except (ImportError, ValueError) as error:
        return common.table(["model", "not run"], [["all", str(error)[:80]]]), {}
    names = ["digits convnet"] if quick else list(CASES)
    seeds = [0] if quick else [0, 1, 2, 3, 4]
    rows, summary, results = [], [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            found = [measure(name, seed, quick, folder) for seed in seeds]
            results[name] = found
            for seed, each in zip(seeds, found):
                accuracy_of = each["accuracy"]
                rows.append([
                    name, seed, f"{accuracy_of['float']:.4f}", f"{accuracy_of['ptq']:.4f}", f"{accuracy_of['qat']:.4f}",
                    f"{(accuracy_of['qat'] - accuracy_of['float']) * 100:+.2f}",
                    f"{(accuracy_of['qat'] - accuracy_of['ptq']) * 100:+.2f}",
                    f"{each['agreement']:.4f}", f"{each['steps']:.0f}", ", ".join(each["float operators"]) or "none",
                ])
            mean = {kind: np.mean([each["accuracy"][kind] for each in found]) for kind in ("float", "ptq", "qat")}
            last = found[-1]
            latency = {kind: common.median(times) for kind, times in last["latency"].items()}
            summary.append([
                name, f"{mean['float']:.4f}", f"{mean['ptq']:.4f}", f"{mean['qat']:.4f}",
                f"{last['size']['float']:,} / {last['size']['ptq']:,} / {last['size']['qat']:,}",
                f"{latency['float'] * 1000:.3f} / {latency['ptq'] * 1000:.3f} / {latency['qat'] * 1000:.3f}",
                f"{common.median(last['epoch']['float']) * 1000:.0f} / "
                f"{common.median(last['epoch']['quantize-aware']) * 1000:.0f} "
                f"({common.ratio(last['epoch']['quantize-aware'], last['epoch']['float']):.1f}x)",
            ])
    header = ["model", "split", "float", "post-training int8", "quantize-aware int8", "QAT - float (points)",
              "QAT - PTQ (points)", "QAT LiteRT agrees with its Keras model", "largest difference (output steps)",
              "QAT operators in float"]
    summary_header = ["model", "float", "PTQ int8", "QAT int8", "bytes float / PTQ / QAT",
                      "ms per batch of 32, float / PTQ / QAT", "ms per epoch of fit, float / QAT"]
    examples = results[names[0]][0]["examples"]
    markdown = (
        f"Accuracy of each `.tflite` in the LiteRT interpreter on the {examples} test digits of each split "
        f"(one example is {100 / examples:.2f} points).\n\n" + common.table(header, rows)
        + "\n\nMeans over the splits; sizes, latency (median of interleaved rounds, one thread) and the cost of "
        "an epoch of training (median of interleaved epochs) from the last split.\n\n"
        + common.table(summary_header, summary)
    )
    return markdown, results


if __name__ == "__main__":
    print(common.machine())
    print(run()[0])
