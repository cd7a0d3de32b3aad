"""Recalibrating BatchNormalization statistics, against one `predict` over the same data.

`bnseq.recalibrate` computes the model segment by segment, one segment per
level of BatchNormalization layers, keeping the activations the next segment
reads: about one forward pass of work, plus one compile per segment. Measured
side by side in one process, interleaved round by round, over the same
samples and batch size:

- warm: `predict` again, and `recalibrate` again on the same model (its
  compiled segments kept, as `predict` keeps its compiled function);
- first call: each on a fresh copy of the model (made outside the timing),
  so each compiles what it needs: the cost a user sees once;
- cache_limit=0: `recalibrate` keeping nothing between segments, so every
  level is computed again from the data (the fallback when memory is short;
  warm).

Peak memory: the peak resident size above the size before the call, sampled
every 5 ms, when each runs once alone in a fresh process (so it includes what
compiling takes; full mode only).
"""

import json
import os
import subprocess
import sys
import time

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
    return [("README example", 512, 32, 5), ("ResNet50 64x64", 512, 32, 5)]


def data_for(model, samples):
    shape = model.inputs[0].shape[1:]
    return np.random.default_rng(0).normal(size=(samples, *shape)).astype("float32")


def candidates(model, x, batch_size):
    return {
        "predict": lambda: model.predict(x, batch_size=batch_size, verbose=0),
        "recalibrate": lambda: bnseq.recalibrate(model, x, batch_size=batch_size, verbose=0),
        "recalibrate, cache_limit=0": lambda: bnseq.recalibrate(
            model, x, batch_size=batch_size, verbose=0, cache_limit=0
        ),
    }


def first_calls(model, x, batch_size, rounds):
    """Seconds of the first `predict` and the first `recalibrate` on fresh copies, interleaved."""
    times = {"predict": [], "recalibrate": []}
    for round_index in range(rounds):
        order = ["predict", "recalibrate"] if round_index % 2 == 0 else ["recalibrate", "predict"]
        for name in order:
            fresh = keras.models.clone_model(model)
            fresh.set_weights(model.get_weights())
            start = time.perf_counter()
            if name == "predict":
                fresh.predict(x, batch_size=batch_size, verbose=0)
            else:
                bnseq.recalibrate(fresh, x, batch_size=batch_size, verbose=0)
            times[name].append(time.perf_counter() - start)
    return times


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
        x = data_for(model, samples)
        times = common.interleaved(candidates(model, x, batch_size), rounds=rounds, warmup=1)
        first = first_calls(model, x, batch_size, rounds=1 if quick else max(2, rounds - 2))
        report = bnseq.recalibrate(model, x, batch_size=batch_size, verbose=0)
        fallback = bnseq.recalibrate(model, x, batch_size=batch_size, verbose=0, cache_limit=0)
        memory = {
            candidate: (float("nan") if quick else peak_memory(name, samples, batch_size, candidate))
            for candidate in ("predict", "recalibrate", "recalibrate, cache_limit=0")
        }
        count = sum(isinstance(layer, layers.BatchNormalization) for layer in model._flatten_layers())
        predict = times["predict"]
        for candidate, seconds, passes in [  # noqa: B007 - `passes` is read below
            ("predict", predict, 1.0),
            ("recalibrate", times["recalibrate"], report.passes),
            ("recalibrate, cache_limit=0", times["recalibrate, cache_limit=0"], fallback.passes),
            ("predict, first call", first["predict"], 1.0),
            ("recalibrate, first call", first["recalibrate"], report.passes),
        ]:
            memory_cell = memory.get(candidate)
            rows.append(
                [
                    name if candidate == "predict" else "",
                    f"{samples}, {count} BN" if candidate == "predict" else "",
                    candidate,
                    f"{passes:.2f}",
                    common.spread(seconds, unit=1.0, digits=2),
                    f"{common.ratio(seconds, predict):.2f}",
                    "—" if memory_cell is None or quick else f"{memory_cell:.0f}",
                ]
            )
        results[name] = {"times": times, "first": first, "memory": memory, "passes": report.passes}
    header = ["model", "samples", "call", "passes", "seconds", "/ predict", "peak MB"]
    return common.table(header, rows), results


def _rss_mb():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_memory(name, samples, batch_size, candidate):
    """Peak resident size above the size before the run, sampled every 5 ms (Linux)."""
    import threading

    model = MODELS[name]()
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
