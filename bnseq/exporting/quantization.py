"""Quantized LiteRT exports (int8, float16): the arguments checked, and what quantization cost.

An int8 export is calibrated on `data=` (optionally recalibrated first, with
every variable put back afterwards) and measured against the float model in
LiteRT: argmax agreement, mean relative difference, size and latency beside a
float export of the same folded model, timed interleaved.
"""

import dataclasses
import os
import tempfile

import numpy as np

from bnseq.exporting import runtimes

# For quantized LiteRT exports, of the mean absolute difference over the mean
# absolute output on `data` (int8 has 256 levels per tensor).
QUANTIZED_RTOL = {"float16": 1e-2, "int8": 0.1}


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
    """

    kind: str
    examples: int
    agreement: object
    mean_rel: float
    float_size: int
    float_latency: float
    recalibrated: bool


def check_quantize(quantize, chosen, data, recalibrate):
    if quantize is not None:
        if quantize not in QUANTIZED_RTOL:
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
    agreements = [
        float(np.mean(np.argmax(reference, -1) == np.argmax(outputs[name], -1)))
        for name, reference in expected.items()
        if reference.ndim == 2 and reference.shape[-1] > 1
    ]
    mean_abs = sum(float(np.mean(np.abs(np.asarray(outputs[name], np.float64) - reference)))
                   for name, reference in expected.items())
    scale = sum(float(np.mean(np.abs(np.asarray(reference, np.float64)))) for reference in expected.values())
    with tempfile.TemporaryDirectory() as directory:
        other = os.path.join(directory, "float.tflite")
        runtimes.write(target, other, "litert")
        run_float = runtimes.loaded(runtimes.run_litert, other, names, threads, "litert", True, None, inputs)
        latency, float_latency = runtimes.interleaved_latency([lambda: run(inputs), lambda: run_float(inputs)])
        float_size = runtimes.size(other)
    quantization = Quantization(
        kind=kind,
        examples=len(next(iter(expected.values()))),
        agreement=min(agreements) if agreements else None,
        mean_rel=mean_abs / scale if scale else mean_abs,
        float_size=float_size,
        float_latency=float_latency,
        recalibrated=bool(recalibrate),
    )
    return quantization, latency
