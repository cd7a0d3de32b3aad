"""Quantized LiteRT exports (int8, float16): the arguments checked, and what quantization cost.

An int8 export is calibrated on `data=` (optionally recalibrated first, with
every variable put back afterwards) and measured against the float model in
LiteRT: argmax agreement, mean relative difference, size and latency beside a
float export of the same folded model, timed interleaved.

A quantize-aware model (`bnseq.quantize_aware`) carries its ranges: the
converter reads them from its FakeQuant ops, with no data, and the artifact
is checked against the quantize-aware model itself, which computes what int8
LiteRT computes up to rounding order: the largest difference is counted in
steps of the output's int8 scale, and every operator left computing in float
is named.
"""

import dataclasses
import os
import tempfile

import keras
import numpy as np

from bnseq import internals
from bnseq.changing import quantized_layers
from bnseq.exporting import checking
from bnseq.exporting import runtimes

# The converter's mode for a quantize-aware model (ranges from its FakeQuant ops).
QUANTIZE_AWARE = "quantize-aware"
# For quantized LiteRT exports, of the mean absolute difference over the mean
# absolute output on `data` (int8 has 256 levels per tensor). A quantize-aware
# model is compared with itself: LiteRT rounds the bias to int32 and rescales in
# fixed point, which moves an output by a step here and there and not more
# (measured on the digits: mean relative 1e-3 to 4e-3).
QUANTIZED_RTOL = {"float16": 1e-2, "int8": 0.1, QUANTIZE_AWARE: 0.02}


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a quantized LiteRT export compares with the float model, on `data`.

    Attributes:
        kind: str. `"int8"` or `"float16"`.
        examples: int. Examples of `data` compared.
        agreement: float or None. Fraction of examples whose top-1 class
            (argmax of the last axis) is the float model's, for outputs of
            shape `(batch, classes)`; the lowest over such outputs. `None`
            when no output is a classifier's.
        mean_rel: float. Mean absolute difference over the mean absolute
            float output.
        float_size: int. Bytes of the float LiteRT export of the same model.
        float_latency: float. Median seconds per run of that float export in
            the interpreter, timed interleaved with the quantized one.
        recalibrated: bool. Whether the statistics were recalibrated on
            `data` before folding.
        steps: float or None. For a quantize-aware model: the largest
            difference from it, in steps of the output's int8 scale.
        float_operators: tuple of str. For a quantize-aware model: the
            LiteRT operators that compute in float (none where every layer
            trained for int8).
        aware: bool. Whether the model is quantize-aware (compared with
            itself rather than with a float model).
    """

    kind: str
    examples: int
    agreement: object
    mean_rel: float
    float_size: object
    float_latency: object
    recalibrated: bool
    steps: object = None
    float_operators: tuple = ()
    aware: bool = False


def check_quantize(quantize, chosen, data, recalibrate):
    if quantize is not None:
        if quantize not in ("int8", "float16"):
            raise ValueError(f"quantize= takes 'int8' or 'float16'. Received: quantize={quantize!r}")
        if chosen != "litert":
            raise ValueError(
                f"quantize= is for LiteRT exports (.tflite); this export is {chosen}. Received: quantize={quantize!r}"
            )
        if data is None:
            raise ValueError(
                f"quantize={quantize!r} needs data=: the inputs the quantized model is checked on "
                "(and, for int8, calibrated on), e.g. a few hundred examples of the training set."
            )
    elif data is not None:
        raise ValueError("data= is for quantize=; to check a float export on real inputs, pass them as sample=.")
    if recalibrate and data is None:
        raise ValueError("recalibrate=True needs data=: the inputs to compute the statistics over.")


def quantization(kind, target, expected, outputs, inputs, names, threads, recalibrate, run):
    """The `Quantization` of a quantized export, and its latency (timed interleaved with a float export)."""
    agreement, mean_rel = _agreement(expected, outputs)
    with tempfile.TemporaryDirectory() as directory:
        other = os.path.join(directory, "float.tflite")
        runtimes.write(target, other, "litert")
        run_float = runtimes.loaded(runtimes.run_litert, other, names, threads, "litert", True, None, inputs)
        latency, float_latency = runtimes.interleaved_latency([lambda: run(inputs), lambda: run_float(inputs)])
        float_size = runtimes.size(other)
    quantization = Quantization(
        kind=kind,
        examples=len(next(iter(expected.values()))),
        agreement=agreement,
        mean_rel=mean_rel,
        float_size=float_size,
        float_latency=float_latency,
        recalibrated=bool(recalibrate),
    )
    return quantization, latency


# A quantize-aware model ----------------------------------------------------------------------------


def quantize_aware_layers(model):
    """The `QuantizedLinear` and `ActivationQuantizer` layers inside `model` (none for any other model)."""
    kinds = (quantized_layers.QuantizedLinear, quantized_layers.ActivationQuantizer)
    return [layer for layer in internals.inner_layers(model) if isinstance(layer, kinds)]


def check_quantize_aware(model, quantize, chosen, recalibrate):
    """The converter's mode for a quantize-aware model; raises where the export cannot hold its ranges."""
    if quantize not in (None, "int8"):
        raise ValueError(
            f"Model '{model.name}' is quantize-aware (bnseq.quantize_aware): it exports as int8, from the ranges "
            f"it learned. Export it without quantize=, or the float model with it. Received: quantize={quantize!r}"
        )
    if recalibrate:
        raise ValueError(
            f"recalibrate= sets the statistics of a float model before it is quantized; model '{model.name}' is "
            "quantize-aware and its statistics are part of its training. Export it without recalibrate=."
        )
    untrained = [
        layer.name for layer in internals.inner_layers(model)
        if isinstance(layer, quantized_layers.ActivationQuantizer) and layer.fixed_range is None
        and float(keras.ops.convert_to_numpy(layer.seen)) == 0.0
    ]
    if untrained:
        raise ValueError(
            f"Model '{model.name}' is quantize-aware but has not trained: the ranges of {', '.join(untrained[:5])}"
            f"{' and others' if len(untrained) > 5 else ''} are still their initial guess. Train it with fit "
            "(a few epochs at a small learning rate) before exporting it."
        )
    # LiteRT and ONNX carry the ranges (ONNX as QuantizeLinear / DequantizeLinear pairs); the others run
    # the model's own FakeQuant ops, which compute exactly what it computes.
    return QUANTIZE_AWARE if chosen in ("litert", "onnx") else None


def quantize_aware_check(expected, outputs, path, inputs, threads, run, chosen):
    """The `Quantization` of a quantize-aware export against the model itself, and its latency.

    In LiteRT the largest difference is counted in steps of each output's
    int8 scale, and the operators left in float are listed. In ONNX the
    ranges are QuantizeLinear / DequantizeLinear pairs, but tf2onnx (1.17)
    folds each weight's FakeQuant into a float constant on the int8 grid, so
    ONNX Runtime computes the linear ops in float on rounded weights: the
    mean difference is checked, and `steps` is `None`.
    """
    steps, left = None, ()
    if chosen == "litert":
        scales = checking.paired(expected, runtimes.output_scales(path), "litert")
        steps = max(
            float(np.max(np.abs(np.asarray(outputs[name], np.float64) - reference))) / scales[name]
            if scales.get(name) else float("nan")
            for name, reference in expected.items()
        )
        left = tuple(runtimes.float_operators(path))
    agreement, mean_rel = _agreement(expected, outputs)
    (latency,) = runtimes.interleaved_latency([lambda: runtimes.timed(run)(inputs)])
    quantization = Quantization(
        kind="int8" if chosen == "litert" else "int8 QDQ", examples=len(next(iter(expected.values()))),
        agreement=agreement, mean_rel=mean_rel, float_size=None, float_latency=None, recalibrated=False,
        steps=steps, float_operators=left, aware=True,
    )
    return quantization, latency


def _agreement(expected, outputs):
    """Top-1 agreement (the lowest over classifier outputs, or None) and the mean relative difference."""
    agreements = [
        float(np.mean(np.argmax(reference, -1) == np.argmax(outputs[name], -1)))
        for name, reference in expected.items()
        if reference.ndim == 2 and reference.shape[-1] > 1
    ]
    mean_abs = sum(float(np.mean(np.abs(np.asarray(outputs[name], np.float64) - reference)))
                   for name, reference in expected.items())
    scale = sum(float(np.mean(np.abs(np.asarray(reference, np.float64)))) for reference in expected.values())
    return (min(agreements) if agreements else None), (mean_abs / scale if scale else mean_abs)
