"""Loading: `keras.saving.load_model` of the bnseq model against the hand-written one.

keras.Sequential's `from_config` re-adds every saved layer, rebuilding after
each; bnseq's adds them all and builds once.
"""

import os
import tempfile

import keras

from benchmarks import build as build_module
from benchmarks import common


def run(quick=False):
    units = 5 if quick else 100
    rounds = 1 if quick else 3
    folder = tempfile.mkdtemp()
    paths = {}
    for name, make in (("bnseq", build_module.build_bnseq), ("keras", build_module.build_by_hand)):
        paths[name] = os.path.join(folder, f"{name}.keras")
        make(units).save(paths[name])

    def load(name):
        keras.backend.clear_session()
        return keras.saving.load_model(paths[name])

    loaded = load("bnseq")
    assert len(loaded.layers) == 3 * units
    times = common.interleaved({name: (lambda n=name: load(n)) for name in paths}, rounds=rounds, warmup=0)
    ratio = common.ratio(times["bnseq"], times["keras"])
    row = [units, 3 * units, common.spread(times["bnseq"], unit=1, digits=2),
           common.spread(times["keras"], unit=1, digits=2), f"{ratio:.3f}"]
    header = ["units N", "layers", "bnseq load s", "keras load s", "bnseq/keras"]
    return common.table(header, [row]), {"times": times, "ratio": ratio}
