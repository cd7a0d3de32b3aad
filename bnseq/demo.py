"""The `bnseq demo` job: why placement matters, shown on a small real task.

Trains three versions of one network on scikit-learn's bundled 8x8 digits,
with the same seed, optimizer and steps: without batch normalization, with the
naive placement users write (`Dense(..., activation=...)` then
`BatchNormalization()`, biases kept), and with
`bnseq.Sequential(batch_norm=True)`. Prints a table, folds the bnseq network
and lints the naive one, and saves a plot of test accuracy against step.
"""

import os
import time

import keras
import numpy as np
from keras import layers

import bnseq
from bnseq import kinds
from bnseq.changing.folding import fold_with_report

# Three sigmoid layers of 100 units trained with plain SGD: the setting of
# Figure 1 of Ioffe & Szegedy (2015), where batch normalization matters most.
HIDDEN = (100, 100, 100)
ACTIVATION = "sigmoid"
LEARNING_RATE = 0.1
BATCH_SIZE = 32
# The moving statistics used at test time. Keras's default, 0.99, needs a few
# hundred steps to forget its initial values, which at 42 steps an epoch would
# hide the first epochs' progress; both normalized networks use the same value.
MOMENTUM = 0.9
NAMES = ("no batch norm", "naive placement", "bnseq")


def load_data(seed):
    """The digits, scaled to [0, 1], split 75/25 with `seed` (no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def build(kind, seed):
    """One of the three networks; the same initial kernels for each seed."""
    keras.utils.set_random_seed(seed)
    hidden = [layers.Dense(units, activation=ACTIVATION) for units in HIDDEN]
    output = layers.Dense(10, activation="softmax")
    if kind == "no batch norm":
        return keras.Sequential([keras.Input((64,)), *hidden, output], name="no_bn")
    if kind == "naive placement":
        naive = [keras.Input((64,))]
        for layer in hidden:
            naive += [layer, layers.BatchNormalization(momentum=MOMENTUM)]
        return keras.Sequential([*naive, output], name="naive")
    model = bnseq.Sequential(
        [keras.Input((64,)), *hidden], batch_norm={"momentum": MOMENTUM}, name="bnseq"
    )
    model.add(output, batch_norm=False)
    return model


def wasted_bias_parameters(model):
    """Parameters of biases that a BatchNormalization right after cancels."""
    return sum(
        int(layer.bias.shape[0])
        for layer, following in zip(model.layers, model.layers[1:])
        if kinds.is_linear(layer)
        and layer.use_bias
        and isinstance(following, layers.BatchNormalization)
    )


class _TestAccuracy(keras.callbacks.Callback):
    """Test accuracy every `every` steps, and one line per epoch."""

    def __init__(self, x, y, every, label, epochs, print_fn):
        super().__init__()
        self.x, self.y, self.every = x, y, every
        self.label, self.epochs, self.print_fn = label, epochs, print_fn
        self.steps, self.accuracy, self.step = [], [], 0

    def measure(self):
        probabilities = keras.ops.convert_to_numpy(self.model(self.x, training=False))
        return float(np.mean(np.argmax(probabilities, axis=-1) == self.y))

    def on_train_begin(self, logs=None):
        self.steps.append(0)
        self.accuracy.append(self.measure())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self.steps.append(self.step)
            self.accuracy.append(self.measure())

    def on_train_end(self, logs=None):
        if self.steps[-1] != self.step:
            self.steps.append(self.step)
            self.accuracy.append(self.measure())

    def on_epoch_end(self, epoch, logs=None):
        self.print_fn(
            f"  {self.label:<16} epoch {epoch + 1:>2}/{self.epochs}  "
            f"loss {logs['loss']:.3f}  test accuracy {self.measure():.3f}"
        )


def train(kind, data, epochs, seed, print_fn):
    """Train one network; returns (model, steps, accuracies, seconds)."""
    x_train, x_test, y_train, y_test = data
    model = build(kind, seed)
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
    )
    tracker = _TestAccuracy(x_test, y_test, 10, kind, epochs, print_fn)
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=BATCH_SIZE,
        shuffle=True,
        verbose=0,
        callbacks=[tracker],
    )
    return model, tracker.steps, tracker.accuracy, time.perf_counter() - start


def inference_ratio(model, folded, x, rounds=15, calls=10):
    """Median seconds per `predict_on_batch`, folded over original, interleaved."""
    for each in (model, folded):
        each.compile()
        each.predict_on_batch(x)
    times = {"model": [], "folded": []}
    for round_index in range(rounds):
        order = ("model", "folded") if round_index % 2 == 0 else ("folded", "model")
        for name in order:
            target = model if name == "model" else folded
            start = time.perf_counter()
            for _ in range(calls):
                target.predict_on_batch(x)
            times[name].append((time.perf_counter() - start) / calls)
    return float(np.median(times["folded"]) / np.median(times["model"]))


def plot(curves, path, epochs):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.2))
    for name, (steps, accuracy) in curves.items():
        axes.plot(steps, accuracy, label=name)
    axes.set_xlabel("training step (batch of 32)")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.set_title(
        f"Digits, 3x100 {ACTIVATION} MLP, SGD lr={LEARNING_RATE}, {epochs} epochs"
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def run(epochs=15, seed=0, out="bnseq-demo.png", print_fn=print):
    """The whole demo; returns the exit status (0)."""
    data = load_data(seed)
    x_train, x_test, _, _ = data
    print_fn(
        f"Digits (scikit-learn, 8x8): {len(x_train)} training and {len(x_test)} "
        f"test images. Three {len(HIDDEN)}x{HIDDEN[0]} {ACTIVATION} networks, "
        f"SGD lr={LEARNING_RATE}, batch {BATCH_SIZE}, {epochs} epochs, seed {seed}."
    )
    results = {}
    for kind in NAMES:
        results[kind] = train(kind, data, epochs, seed, print_fn)

    rows = []
    for kind in NAMES:
        model, _, accuracy, seconds = results[kind]
        rows.append(
            (kind, f"{model.count_params():,}", f"{wasted_bias_parameters(model):,}",
             f"{accuracy[-1]:.3f}", f"{seconds:.1f} s")
        )
    header = ("network", "parameters", "wasted on biases", "test accuracy", "training time")
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    print_fn("")
    for row in (header, *rows):
        print_fn("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))

    model = results["bnseq"][0]
    folded, report = fold_with_report(model)
    difference = float(
        np.max(np.abs(model.predict_on_batch(x_test) - folded.predict_on_batch(x_test)))
    )
    ratio = inference_ratio(model, folded, x_test)
    print_fn(
        f"\nFolded the bnseq network for inference: {sum(d.folded for d in report)} of "
        f"{len(report)} BatchNormalization layers folded, {len(model.layers)} -> "
        f"{len(folded.layers)} layers; largest output difference on the test set "
        f"{difference:.1e}; inference time folded/original {ratio:.2f} "
        f"(predict_on_batch on the {len(x_test)} test images, median of interleaved runs)."
    )

    naive = bnseq.fold_report(results["naive placement"][0])
    forward = sum(d.folded and d.into is not None for d in naive)
    print_fn(
        f"The naive network: {sum(d.folded for d in naive)} of {len(naive)} "
        f"BatchNormalization layers fold, {forward} of them forward into the Dense layer after "
        f"them (each comes after a {ACTIVATION}, so none can fold into the layer before it)."
    )

    findings = bnseq.lint(results["naive placement"][0])
    print_fn(f"\nbnseq.lint of the naive network: {len(findings)} findings")
    for finding in findings:
        print_fn(f"  {finding}")

    plot({kind: results[kind][1:3] for kind in NAMES}, out, epochs)
    print_fn(f"\nPlot of test accuracy against training step: {os.path.abspath(out)}")
    return 0
