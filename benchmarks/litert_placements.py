"""What LiteRT's converter leaves of BatchNormalization in 12 placements, with and without `bnseq.fold`.

Each model is one placement of a BatchNormalization with random statistics
(a linear layer before or after it, or a pooling layer or an activation
between). It is exported to a float `.tflite` twice with `bnseq.export`, as it
is (`fold=False`: TensorFlow's converter folds what it can) and folded first,
and the float `MUL` and `ADD` operators of the file are counted, beside the
same layers written without BatchNormalization and with their biases: what
the folded file holds beyond that (LiteRT's CONV_3D, and FULLY_CONNECTED on a
sequence, add their bias with an ADD of their own) is left of the
BatchNormalization. `bnseq.export` checks each file in LiteRT against the
Keras model, so every count is of a model that computes the same outputs.
"""

import os
import tempfile

import keras
import numpy as np
from keras import layers

import bnseq
from benchmarks import common
from bnseq.exporting import runtimes


def _placement(builder, shape, first=False):
    """(the model with its BatchNormalization, the same layers without it and with biases)."""

    def build(batch_norm):
        inputs = keras.Input(shape)
        x = inputs
        if first and batch_norm:
            x = layers.BatchNormalization(name="bn")(x)
        x = builder(x, not batch_norm)
        if batch_norm and not first:
            x = layers.BatchNormalization(name="bn")(x)
        return keras.Model(inputs, x)

    return build


def _placements():
    conv = layers.Conv2D
    return {
        "after Conv2D": _placement(lambda x, bias: conv(8, 3, use_bias=bias)(x), (16, 16, 3)),
        "after Conv1D": _placement(lambda x, bias: layers.Conv1D(8, 3, use_bias=bias)(x), (16, 3)),
        "after DepthwiseConv2D": _placement(lambda x, bias: layers.DepthwiseConv2D(3, use_bias=bias)(x), (16, 16, 4)),
        "after SeparableConv2D": _placement(
            lambda x, bias: layers.SeparableConv2D(8, 3, use_bias=bias)(x), (16, 16, 3)
        ),
        "after Conv2DTranspose": _placement(lambda x, bias: layers.Conv2DTranspose(8, 3, use_bias=bias)(x), (8, 8, 3)),
        "after Dense (2-D)": _placement(lambda x, bias: layers.Dense(8, use_bias=bias)(x), (12,)),
        "after Conv3D": _placement(lambda x, bias: layers.Conv3D(8, 3, use_bias=bias)(x), (8, 8, 8, 3)),
        "after Dense on a sequence": _placement(lambda x, bias: layers.Dense(8, use_bias=bias)(x), (10, 12)),
        "after MaxPooling2D": _placement(
            lambda x, bias: layers.MaxPooling2D()(conv(8, 3, use_bias=bias)(x)), (16, 16, 3)
        ),
        "after AveragePooling2D": _placement(
            lambda x, bias: layers.AveragePooling2D(2)(conv(8, 3, use_bias=bias)(x)), (16, 16, 3)
        ),
        "on the model input": _placement(lambda x, bias: conv(8, 3)(x), (16, 16, 3), first=True),
        "after an activation, nothing after": _placement(lambda x, bias: layers.ReLU()(conv(8, 3)(x)), (16, 16, 3)),
    }


def _randomize(model, generator, positive):
    for layer in model.layers:
        if getattr(layer, "use_bias", False):  # a zero bias would be dropped by the converter
            layer.bias.assign(generator.normal(0, 0.5, layer.bias.shape))
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(generator.normal(0, 0.5, channels))
            layer.moving_variance.assign(generator.uniform(0.3, 2.0, channels))
            gamma = generator.uniform(0.5, 1.5, channels)
            layer.gamma.assign(gamma if positive else gamma * generator.choice([-1.0, 1.0], channels))
            layer.beta.assign(generator.normal(0, 0.5, channels))
    return model


def float_mul_add(path):
    """How many MUL and ADD operators a `.tflite` file holds."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    names = [op["op_name"] for op in interpreter._get_ops_details()]  # LiteRT has no public list of operators
    return sum(name in ("MUL", "ADD") for name in names), names


def measure(names=None):
    """One row per placement (all 12, or those named)."""
    rows = []
    generator = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, build) in enumerate(_placements().items()):
            if names is not None and name not in names:
                continue
            # A maximum commutes with a positive scale only: MaxPooling gets positive gamma (signed elsewhere).
            model = _randomize(build(True), generator, positive="MaxPooling" in name)
            counts = []
            bare = _randomize(build(False), generator, True)
            for kind, candidate, fold in (("as", model, False), ("folded", model, True), ("bare", bare, False)):
                path = os.path.join(folder, f"{index}_{kind}.tflite")
                bnseq.export(candidate, path, fold=fold)
                counts.append(float_mul_add(path))
            (decision,) = bnseq.fold_report(model)
            rows.append((name, counts[0][0], counts[1][0], counts[2][0], counts[1][0] - counts[2][0],
                         "folded" if decision.folded else "kept", " ".join(counts[1][1])))
    return rows


HEADER = ("placement", "MUL+ADD as it is", "after bnseq.fold", "without BN (bias)", "left of BN", "fold",
          "operators after fold")


def run(quick=False):
    try:  # the converter's artifacts are counted in LiteRT (the litert extra)
        runtimes.runtime("litert")
    except (ImportError, ValueError) as error:
        return common.table(["placement", "not run"], [["all 12", str(error)[:80]]]), []
    names = ["after Conv2D", "after MaxPooling2D", "after an activation, nothing after"] if quick else None
    rows = measure(names)
    foldable = [row for row in rows if row[0] != "after an activation, nothing after"]
    left = sum(row[4] for row in foldable)
    markdown = (
        "Float `.tflite` files written by `bnseq.export` (each checked in LiteRT), as the model is (`fold=False`: "
        "TensorFlow's converter folds what it can) and folded first; the float MUL and ADD operators counted, "
        "beside the same layers without BatchNormalization and with a bias (\"left of BN\" is the difference).\n\n"
        + common.table(HEADER, rows)
        + f"\n\nLeft of BatchNormalization in the {len(foldable)} foldable placements after bnseq.fold: {left}."
    )
    return markdown, rows


if __name__ == "__main__":
    print(common.machine())
    print(run()[0])
