"""Exported models in their runtimes: folded against unfolded, ONNX Runtime and LiteRT.

Each model is exported twice with Keras's `Model.export` (as `bnseq.export`
does): as it is, and folded. Both artifacts are loaded in the runtime and run
on the same batch, interleaved round by round, with one thread and with the
runtime's default (all cores).
"""

import os
import tempfile

import keras
import numpy as np
from keras import layers

import bnseq
from benchmarks import common
from benchmarks import fold_inference
from bnseq.export import _litert
from bnseq.export import _loaded
from bnseq.export import _onnx
from bnseq.export import _runtime
from bnseq.export import _write


def decoder():
    """Three Conv2DTranspose units: where ONNX Runtime does not fuse BatchNormalization."""
    return bnseq.Sequential(
        [
            keras.Input((8, 8, 32)),
            layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu"),
            layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu"),
            layers.Conv2DTranspose(3, 3, strides=2, padding="same"),
        ],
        batch_norm=True,
    )


def resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)


def tiny():
    return bnseq.Sequential([keras.Input((8,)), layers.Dense(8, activation="relu"), layers.Dense(2)], batch_norm=True)


def cases(quick):
    """(name, builder, batch, rounds)."""
    if quick:
        return [("tiny MLP", tiny, 2, 2)]
    return [
        ("decoder, 3 Conv2DTranspose", decoder, 8, 15),
        ("README example", common.readme_example, 8, 9),
        ("small convnet", lambda: fold_inference.convnet(True), 8, 15),
        ("ResNet50 64x64", resnet50, 8, 9),
    ]


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
    return model


def runs(model, folded, x, runtime, suffix, threads, directory):
    """(unfolded run, folded run) in the runtime."""
    out = []
    for name, each in (("unfolded", model), ("folded", folded)):
        path = os.path.join(directory, f"{name}.{suffix}")
        if not os.path.exists(path):
            bnseq.probes.infer(each, x)
            _write(each, path, {"onnx": "onnx", "tflite": "litert"}[suffix])
        out.append(_loaded(runtime, path, [x], threads, suffix)[0])
    return out


def run(quick=False):
    rows, results = [], {}
    for name, build, batch, rounds in cases(quick):
        model = randomize(build())
        x = np.random.default_rng(1).normal(size=(batch, *model.inputs[0].shape[1:])).astype("float32")
        folded = bnseq.fold(model)
        with tempfile.TemporaryDirectory() as directory:
            for runtime_name, runtime, suffix in (
                ("ONNX Runtime", _onnx, "onnx"),
                ("LiteRT", _litert, "tflite"),
            ):
                try:  # the runtime and its exporter installed (the onnx and litert extras)?
                    _runtime({"onnx": "onnx", "tflite": "litert"}[suffix])
                except (ImportError, ValueError) as error:
                    rows.append([name, runtime_name, "—", "—", "—", f"not run: {error}"[:80]])
                    continue
                for threads in (1, None):
                    try:
                        unfolded_run, folded_run = runs(model, folded, x, runtime, suffix, threads, directory)
                    except ValueError as error:
                        rows.append([name, runtime_name, threads or "all", "—", "—", f"not run: {error}"[:80]])
                        continue
                    times = common.interleaved(
                        {"unfolded": unfolded_run, "folded": folded_run}, rounds=rounds, calls=5 if not quick else 1
                    )
                    rows.append(
                        [
                            name,
                            runtime_name,
                            threads or "all",
                            common.spread(times["unfolded"], digits=3),
                            common.spread(times["folded"], digits=3),
                            f"{common.ratio(times['folded'], times['unfolded']):.2f}",
                        ]
                    )
                    results[(name, runtime_name, threads)] = times
    header = ["model", "runtime", "threads", "unfolded ms", "folded ms", "folded/unfolded"]
    return common.table(header, rows), results
