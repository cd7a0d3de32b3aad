"""Training: one epoch of `fit` for the bnseq model against the hand-written one.

They are the same computation: started from the same weights and fed the same
batches, they end the epoch with the same weights (checked here), so any time
difference is noise or overhead outside the training step.

Epochs are timed inside `fit` by a callback (on_epoch_begin to on_epoch_end):
repeated `fit` calls on this machine grow slower call after call for either
model (measured: 450 ms to over 1 s per epoch over 15 calls), which would
swamp the comparison.
"""

import time

import keras
import numpy as np

from benchmarks import build as build_module
from benchmarks import common


def run(quick=False):
    units = 3 if quick else 20
    samples = 256 if quick else 16384
    rounds = 1 if quick else 21
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 16)).astype("float32")
    y = rng.normal(size=(samples, 16)).astype("float32")
    ours, theirs = build_module.build_bnseq(units), build_module.build_by_hand(units)
    theirs.set_weights(ours.get_weights())
    models = {"bnseq": ours, "keras": theirs}
    for model in models.values():
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")

    # The same computation: one epoch each from the same weights, same batches.
    for model in models.values():
        model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    difference = max(
        float(np.max(np.abs(a - b))) for a, b in zip(ours.get_weights(), theirs.get_weights())
    )

    times = {name: [] for name in models}
    names = list(models)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            timer = _EpochTimer()
            models[name].fit(
                x, y, batch_size=64, epochs=2, shuffle=False, verbose=0, callbacks=[timer]
            )
            times[name].extend(timer.seconds)
    # Slow spells on a shared machine last seconds: each bnseq epoch is paired
    # with the Keras epoch run right next to it, and the median taken of those
    # ratios, besides the ratio of the medians.
    paired = [a / b for a, b in zip(times["bnseq"], times["keras"])]
    ratio = common.ratio(times["bnseq"], times["keras"])
    row = [units, samples // 64, common.spread(times["bnseq"], digits=0),
           common.spread(times["keras"], digits=0), f"{ratio:.3f}",
           f"{common.median(paired):.3f} ({min(paired):.2f}–{max(paired):.2f})", f"{difference:.1e}"]
    header = ["units N", "steps", "bnseq epoch ms", "keras epoch ms", "ratio of medians",
              "median of paired ratios", "max weight difference after one epoch from equal weights"]
    return common.table(header, [row]), {
        "times": times, "ratio": ratio, "paired": common.median(paired), "difference": difference
    }


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
