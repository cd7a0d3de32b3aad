"""Exported models in their runtimes: folded against unfolded, and int8 LiteRT against float.

Float: each model is exported twice with Keras's `Model.export` (as
`bnseq.export` does): as it is, and folded. Both artifacts are loaded in the
runtime and run on the same batch, interleaved round by round, with one
thread and with the runtime's default (all cores).

int8: each model, trained on scikit-learn's digits, goes through
`bnseq.export(quantize="int8")` twice: with its BatchNormalization folded by
bnseq first, and left to the LiteRT converter (`fold=False`). The table gives
test accuracy float and int8 (run in the interpreter), top-1 agreement with
the float model, the size and the latency of the int8 file against the float
one (one thread, interleaved), and the operators of the int8 model (what
BatchNormalization left behind shows as MUL and ADD).
"""

import os
import tempfile

import keras
import numpy as np
from keras import layers

import bnseq
from benchmarks import common
from benchmarks import fold_inference
from bnseq import demo
from bnseq.exporting import runtimes


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
            runtimes.write(each, path, {"onnx": "onnx", "tflite": "litert"}[suffix])
        names = [tensor.name for tensor in each.inputs]
        run = runtimes.loaded(runtime, path, names, threads, suffix, True, None, [x])
        out.append(lambda run=run: run([x]))
    return out


def run(quick=False):
    rows, results = [], {}
    for name, build, batch, rounds in cases(quick):
        model = randomize(build())
        x = np.random.default_rng(1).normal(size=(batch, *model.inputs[0].shape[1:])).astype("float32")
        folded = bnseq.fold(model)
        with tempfile.TemporaryDirectory() as directory:
            for runtime_name, runtime, suffix in (
                ("ONNX Runtime", runtimes.run_onnx, "onnx"),
                ("LiteRT", runtimes.run_litert, "tflite"),
            ):
                try:  # the runtime and its exporter installed (the onnx and litert extras)?
                    runtimes.runtime({"onnx": "onnx", "tflite": "litert"}[suffix])
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
    table = common.table(header, rows)
    try:
        runtimes.runtime("litert")
    except (ImportError, ValueError) as error:
        return table + f"\n\nint8: not run: {error}", results
    int8_table, results["int8"] = int8(quick)
    return table + "\n\n" + int8_table, results


# int8: digits-trained models, BatchNormalization folded by bnseq or left to the converter.


def digits(shape):
    """The demo's split of the digits, as images of `shape` (upsampled and repeated over channels)."""
    x_train, x_test, y_train, y_test = demo.load_data(seed=0)
    if len(shape) == 1:
        return x_train, x_test, y_train, y_test
    if shape[0] != shape[1]:  # not an image the digits fit (the README example's 3x100x100): random inputs
        rng = np.random.default_rng(0)
        return rng.normal(size=(200, *shape)).astype("float32"), rng.normal(size=(100, *shape)).astype("float32"), \
            None, None
    height, width, channels = shape
    scale = height // 8

    def images(x):
        x = x.reshape(-1, 8, 8, 1).repeat(scale, axis=1).repeat(scale, axis=2)
        return np.ascontiguousarray(np.repeat(x, channels, axis=3))

    return images(x_train), images(x_test), y_train, y_test


def digits_convnet():
    """Two convolutions around a Conv2DTranspose, batch-normalized by bnseq.Sequential."""
    return bnseq.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2DTranspose(32, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10, activation="softmax"),
        ],
        batch_norm=True,
    )


def mobilenet_v2():
    return keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)


def int8_cases(quick):
    """(name, builder, epochs); every model ends in a 10-way softmax."""
    if quick:
        return [("naive placement MLP", lambda: demo.build("naive placement", 0), 1)]
    return [
        ("README example (untrained, random inputs)", common.readme_example, 0),
        ("naive placement MLP (the demo's)", lambda: demo.build("naive placement", 0), 10),
        ("digits convnet with Conv2DTranspose", digits_convnet, 8),
        ("MobileNetV2 alpha 0.35, 32x32", mobilenet_v2, 8),
    ]


def operators(path):
    """The operators of a LiteRT model, counted: `"FULLY_CONNECTED x3, MUL x2"`."""
    from ai_edge_litert.interpreter import Interpreter

    names = [op["op_name"] for op in Interpreter(model_path=path)._get_ops_details()]  # no public listing
    counts = {name: names.count(name) for name in sorted(set(names))}
    return ", ".join(f"{name} x{count}" if count > 1 else name for name, count in counts.items())


def accuracy_of(probabilities, labels):
    return None if labels is None else float(np.mean(np.argmax(probabilities, -1) == labels))


def _shown(accuracy):
    return "—" if accuracy is None else f"{accuracy:.3f}"


def int8(quick):
    rows, results = [], {}
    for name, build, epochs in int8_cases(quick):
        model = build()
        x_train, x_test, y_train, y_test = digits(tuple(model.inputs[0].shape[1:]))
        if epochs:
            model.compile(keras.optimizers.Adam(1e-2 if epochs < 5 else 3e-3), "sparse_categorical_crossentropy")
            model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
        bnseq.recalibrate(model, x_train, verbose=0)  # the statistics the float model is measured with
        float_accuracy = accuracy_of(bnseq.probes.predicted(model, x_test, batch_size=32), y_test)
        with tempfile.TemporaryDirectory() as directory:
            for handled, fold in (("bnseq", True), ("converter", False)):
                path = os.path.join(directory, f"{handled}.tflite")
                try:
                    report = bnseq.export(model, path, quantize="int8", data=x_train, fold=fold, threads=1,
                                          min_agreement=0.0, rtol=np.inf)
                except ValueError as error:
                    rows.append([name, handled, _shown(float_accuracy), "—", "—", "—", "—", f"not run: {error}"[:60]])
                    continue
                names = [tensor.name for tensor in model.inputs]
                run = runtimes.run_litert(path, names, 1)
                (_, probabilities), = run([x_test])
                accuracy = accuracy_of(probabilities, y_test)
                q = report.quantization
                listed = operators(path)
                rows.append([
                    name, handled, _shown(float_accuracy), _shown(accuracy), f"{q.agreement:.3f}",
                    f"{report.size / q.float_size:.2f}", f"{report.latency / q.float_latency:.2f}",
                    listed,
                ])
                results[(name, handled)] = {
                    "float accuracy": float_accuracy, "int8 accuracy": accuracy, "agreement": q.agreement,
                    "size ratio": report.size / q.float_size, "latency ratio": report.latency / q.float_latency,
                    "operators": listed,
                }
    header = ["model", "BN folded by", "float acc", "int8 acc", "agreement", "size int8/float",
              "latency int8/float", "int8 operators"]
    return common.table(header, rows), results
