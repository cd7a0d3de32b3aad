"""Training: one epoch of `fit` for the bnseq model against the hand-written one.

They are the same computation: started from the same weights and fed the same
batches, they end the epoch with the same weights (checked here), so any time
difference is noise or overhead outside the training step.
"""

import keras
import numpy as np

from benchmarks import build as build_module
from benchmarks import common


def run(quick=False):
    units = 3 if quick else 20
    samples = 256 if quick else 8192
    rounds = 1 if quick else 7
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

    times = common.interleaved(
        {name: (lambda m=model: m.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0))
         for name, model in models.items()},
        rounds=rounds,
        warmup=0,
    )
    ratio = common.ratio(times["bnseq"], times["keras"])
    row = [units, samples // 64, common.spread(times["bnseq"], digits=0),
           common.spread(times["keras"], digits=0), f"{ratio:.3f}", f"{difference:.1e}"]
    header = ["units N", "steps", "bnseq epoch ms", "keras epoch ms", "bnseq/keras",
              "max weight difference after one epoch from equal weights"]
    return common.table(header, [row]), {"times": times, "ratio": ratio, "difference": difference}
