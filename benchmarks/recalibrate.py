"""Recalibrating BatchNormalization statistics, against one `predict` over the same data.

`bnseq.recalibrate` makes one pass over the data per level of BatchNormalization
layers (a layer needs the final statistics of those before it), running the
model eagerly batch by batch and stopping each batch at its level; `predict`
runs the compiled graph once. Both over the same samples and batch size,
interleaved round by round. Peak memory: the peak resident size above the size
before the call, sampled every 5 ms, when each runs alone in a fresh process
(full mode only).

The README's example is channels_first: on a CPU whose TensorFlow lacks oneDNN,
run this with TF_ENABLE_ONEDNN_OPTS=1 (recalibrate runs eagerly).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
from keras import layers

import bnseq
from benchmarks import common


def resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)


def tiny():
    return bnseq.Sequential([keras.Input((8,)), layers.Dense(8, activation="relu"), layers.Dense(2)], batch_norm=True)


MODELS = {"README example": common.readme_example, "ResNet50 64x64": resnet50, "tiny MLP": tiny}


def cases(quick):
    """(name, samples, batch size, rounds)."""
    if quick:
        return [("tiny MLP", 32, 8, 1)]
    return [("README example", 512, 32, 3), ("ResNet50 64x64", 512, 32, 2)]


def data_for(model, samples):
    shape = model.inputs[0].shape[1:]
    return np.random.default_rng(0).normal(size=(samples, *shape)).astype("float32")


def candidates(model, x, batch_size):
    return {
        "predict": lambda: model.predict(x, batch_size=batch_size, verbose=0),
        "recalibrate": lambda: bnseq.recalibrate(model, x, batch_size=batch_size, verbose=0),
    }


def levels(model):
    from bnseq.recalibrate import _levels

    return len(_levels(bnseq.graph.walk(model)))


def peak_memory(name, samples, batch_size, candidate):
    """Peak RSS growth (MB) when `candidate` runs once in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.recalibrate", json.dumps([name, samples, batch_size, candidate])],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if result.returncode != 0:
        return float("nan")
    return float(result.stdout.strip().splitlines()[-1])


def run(quick=False):
    rows, results = [], {}
    for name, samples, batch_size, rounds in cases(quick):
        model = MODELS[name]()
        model.compile()
        x = data_for(model, samples)
        times = common.interleaved(candidates(model, x, batch_size), rounds=rounds, warmup=1)
        memory = {
            candidate: (float("nan") if quick else peak_memory(name, samples, batch_size, candidate))
            for candidate in ("predict", "recalibrate")
        }
        count = sum(isinstance(layer, layers.BatchNormalization) for layer in model._flatten_layers())
        rows.append(
            [
                name,
                samples,
                count,
                levels(model),
                common.spread(times["predict"], unit=1.0, digits=2),
                common.spread(times["recalibrate"], unit=1.0, digits=2),
                f"{common.ratio(times['recalibrate'], times['predict']):.1f}",
                "—" if quick else f"{memory['predict']:.0f}",
                "—" if quick else f"{memory['recalibrate']:.0f}",
            ]
        )
        results[name] = (times, memory)
    header = [
        "model", "samples", "BN layers", "passes", "predict s", "recalibrate s", "recalibrate/predict",
        "predict peak MB", "recalibrate peak MB",
    ]
    return common.table(header, rows), results


def _rss_mb():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_memory(name, samples, batch_size, candidate):
    """Peak resident size above the size before the run, sampled every 5 ms (Linux)."""
    import threading
    import time

    model = MODELS[name]()
    model.compile()
    x = data_for(model, samples)
    run = candidates(model, x, batch_size)[candidate]
    baseline, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    run()
    done.set()
    thread.join()
    print(max(peak[0], _rss_mb()) - baseline)


if __name__ == "__main__":
    _measure_memory(*json.loads(sys.argv[1]))
