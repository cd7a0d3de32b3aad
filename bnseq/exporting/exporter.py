"""`bnseq.export`: fold, export through Keras's own `Model.export`, and check in the target runtime.

Deployment runtimes fuse BatchNormalization only in part (ONNX Runtime does not
fuse it after ConvTranspose, microsoft/onnxruntime#14270; tf2onnx leaves some
as Mul/Add, onnx/tensorflow-onnx#1079; the LiteRT converter folds it only
after Conv2D, DepthwiseConv2D and FullyConnected). `export` folds first
(`bnseq.fold`), writes the artifact with Keras's exporter next to its target,
loads it in the runtime it is for (ONNX Runtime, the LiteRT interpreter,
`tf.saved_model.load`, Keras), runs it on a sample, compares with the model,
and only then moves it into place.

The check pairs inputs and outputs by name, never by position (`checking.py`
says how); `runtimes.py` writes and loads the artifact; `quantization.py`
measures an int8 or float16 export against the float one.
"""

import contextlib
import dataclasses
import os
import shutil
import tempfile

import keras

from bnseq import internals
from bnseq import notices
from bnseq import probes
from bnseq.changing import folding
from bnseq.deciding import fold_plan
from bnseq.exporting import checking
from bnseq.exporting import quantization as quantizing
from bnseq.exporting import runtimes
from bnseq.reading import files

FORMATS = {".onnx": "onnx", ".tflite": "litert", ".keras": "keras"}


# Default tolerances, relative to the largest output. By the lowest-precision
# compute dtype in the model: float16 keeps 11 significant bits (a rounding
# step of 1e-3), bfloat16 8 (8e-3), and the runtime rounds in its own order.
RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


class ToleranceError(ValueError):
    """The exported artifact, run in its runtime, differs from the model by more than the tolerance.

    The artifact is kept for inspection under a name that says so
    (`model.failed-check.onnx` for `model.onnx`); the target path is left as it
    was.

    Attributes:
        report: `ExportReport` of the artifact that failed (its `path` is the
            kept one).
    """

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export` wrote and what the runtime computed.

    Attributes:
        path: str. The artifact.
        format: str. `"onnx"`, `"litert"`, `"tf_saved_model"` or `"keras"`.
        size: int. Bytes on disk.
        folded: int. BatchNormalization layers folded away.
        kept: int. BatchNormalization layers kept (see `bnseq.fold_report`).
        max_abs: float. Largest absolute difference, runtime against the
            model in inference mode, on the sample (on `data` when quantized).
        max_rel: float. `max_abs` over the largest absolute model output.
        latency: float. Median seconds per run of the artifact in its runtime
            on the sample.
        unfolded_latency: float or None. The same for an export of the model
            without folding (with `compare=True`), measured interleaved.
        rtol: float or None. The tolerance the check held the artifact to.
        weak: str or None. Why the check says little (the model's outputs
            on the sample do not depend on the input), or `None`.
        quantization: `Quantization` or None. For `quantize=` exports.
    """

    path: str
    format: str
    size: int
    folded: int
    kept: int
    max_abs: float
    max_rel: float
    latency: float
    unfolded_latency: object = None
    rtol: object = None
    weak: object = None
    quantization: object = None

    def __str__(self):
        kind = self.format if self.quantization is None else f"{self.format} {self.quantization.kind}"
        if self.quantization is not None and self.quantization.aware:
            kind += " (quantize-aware)"
        lines = [
            f"{kind} {self.path} ({self.size:,} bytes)",
            f"BatchNormalization: {self.folded} folded, {self.kept} kept",
            f"in the runtime: largest difference {self.max_abs:.3g} (relative {self.max_rel:.3g})",
            f"latency: {self.latency * 1000:.3f} ms per run",
        ]
        if self.unfolded_latency is not None:
            lines[-1] += (
                f"; unfolded export {self.unfolded_latency * 1000:.3f} ms "
                f"(folded/unfolded {self.latency / self.unfolded_latency:.2f})"
            )
        quantization = self.quantization
        if quantization is not None and quantization.aware:
            agreement = "" if quantization.agreement is None else f"top-1 agreement {quantization.agreement:.4f}, "
            lines[2] += f" on {quantization.examples} examples"
            steps = "" if quantization.steps is None else f", largest {quantization.steps:.3g} output steps"
            lines.append(
                f"against the quantize-aware model: {agreement}mean relative difference "
                f"{quantization.mean_rel:.3g}{steps}"
            )
            if self.format == "litert":
                lines.append(f"operators computing in float: {', '.join(quantization.float_operators) or 'none'}")
        elif quantization is not None:
            agreement = "" if quantization.agreement is None else f"top-1 agreement {quantization.agreement:.4f}, "
            lines[2] += f" on {quantization.examples} examples of data"
            lines.append(
                f"against the float model: {agreement}mean relative difference {quantization.mean_rel:.3g}"
                + (" (statistics recalibrated on data)" if quantization.recalibrated else "")
            )
            lines.append(
                f"float export: {quantization.float_size:,} bytes, {quantization.float_latency * 1000:.3f} ms "
                f"per run (size {self.size / quantization.float_size:.2f}x, latency "
                f"{self.latency / quantization.float_latency:.2f}x)"
            )
        if self.weak:
            lines.append(f"weak check: {self.weak}")
        return "\n".join(lines)


def export(model, path, *, format=None, fold=True, sample=None, safe_mode=True, compare=False, rtol=None,
           threads=None, overwrite=False, quantize=None, data=None, recalibrate=False, min_agreement=0.97):
    """Folds, exports with Keras's `Model.export`, and checks the artifact in its runtime.

    The format follows the path (`.onnx` for ONNX Runtime, `.tflite` for
    LiteRT, `.keras` for Keras, a path without a suffix for a TensorFlow
    SavedModel directory) unless `format=` says. The model is folded first
    (`bnseq.fold`, the report counts what was kept), exported to a temporary
    name next to `path`, loaded in its runtime and run on `sample` (by default
    a deterministic standard-normal batch of 2 with the model's input shape,
    unknown sizes taken as 8). Its outputs are compared, input and output by
    name, with the model's as `predict` and as an eager call compute them
    (the closer counts: TensorFlow has known bugs in each,
    `bnseq.probes`). Only when the check passes does the artifact move to
    `path`; missing folders are created.

    Tolerance: the largest absolute difference over the largest absolute
    output must be at most `rtol`: by default 1e-4 for a float32 model, 1e-2
    when any layer computes in float16 (a `mixed_float16` policy) and 5e-2 in
    bfloat16.

    Quantized LiteRT (`quantize="int8"` or `"float16"`, `.tflite` only): the
    folded model (recalibrated on `data` first with `recalibrate=True`; the
    model itself is left as it was) is converted with post-training
    quantization. For int8 it is full-integer: weights, activations, inputs
    and outputs, with up to 300 examples of `data` as the representative
    dataset, and the converter refuses operations without an int8 kernel
    (the error names the layer). The quantized model runs in the interpreter
    on all of `data` (inputs quantized and outputs dequantized with the
    model's own scales and zero points) and is compared with the float model:
    top-1 agreement for classifiers must be at least `min_agreement`, and
    the mean relative difference at most `rtol` (default 0.1 for int8, 1e-2
    for float16). A float export of the same model is written to a temporary
    place for the size and latency comparison in `report.quantization`.

    Args:
        model: `keras.Model` or the path of a `.keras` file.
        path: str or path-like. Where to write; never the file `model` was
            read from.
        format: str, optional. `"onnx"`, `"litert"`, `"tf_saved_model"` or
            `"keras"`; from the path when `None`.
        fold: bool. Fold BatchNormalization first (the default).
        sample: array, list of arrays in the order of `model.inputs`, or dict
            keyed by input name (or by the keys of a model built on a dict of
            inputs), optional. The inputs to check on (with `quantize=`, the
            check runs on `data` and `sample` is what latency is timed on);
            cast to each input's dtype.
        safe_mode: bool. Keras's `safe_mode` for every load, of `model` and of
            a `.keras` artifact in the check.
        compare: bool. Also export the unfolded model (to a temporary place)
            and time both in the runtime.
        rtol: float, optional. The tolerance; by the model's compute dtype
            (or the quantization) when `None`.
        threads: int, optional. Threads for the runtime when timing (its own
            default when `None`).
        overwrite: bool. Replace a SavedModel directory that is not empty.
            Files are replaced whatever this says.
        quantize: `None`, `"int8"` or `"float16"`. Quantized LiteRT.
        data: inputs as for `sample`, with any number of examples. For
            `quantize=`: calibrates int8 and is what the quantized model is
            checked on.
        recalibrate: bool. Recalibrate the statistics on `data`
            (`bnseq.recalibrate`) before folding; the model keeps its own.
        min_agreement: float. For `quantize=`: the lowest top-1 agreement
            with the float model that passes.

    Returns:
        `ExportReport`.

    Raises:
        ImportError: if the runtime is not installed; the message names the
            bnseq extra to install.
        ToleranceError: a `ValueError`, if the artifact differs by more than
            allowed; it is kept under a `.failed-check` name and the error
            holds its report.
        ValueError: for an unknown format, a `path` that is the model's own
            file or a SavedModel directory that is not empty, inputs that do
            not fit the model, or an artifact its runtime cannot run (kept
            under a `.failed-check` name).

    Examples:
        >>> model = bnseq.Sequential([keras.Input((4,)), keras.layers.Dense(3)], batch_norm=True)
        >>> import tempfile, os
        >>> report = bnseq.export(model, os.path.join(tempfile.mkdtemp(), "model.keras"))
        >>> report.format, report.folded, report.max_rel < 1e-5
        ('keras', 1, True)
    """
    source = None if isinstance(model, keras.Model) else model
    path = os.fspath(path)
    chosen = _format_of(path, format)
    _check_target(path, chosen, source, overwrite)
    model = files.as_model(model, safe_mode=safe_mode)
    aware = quantizing.quantize_aware_layers(model)
    if aware:  # int8 from the ranges it learned; its BatchNormalization is folded in its units already
        quantize, fold = quantizing.check_quantize_aware(model, quantize, chosen, recalibrate), False
    else:
        quantizing.check_quantize(quantize, chosen, data, recalibrate)
    runtime = runtimes.runtime(chosen)
    inputs = probes.random_inputs(model) if sample is None else checking.flat_inputs(model, sample, "sample")
    checked = inputs if data is None else checking.flat_inputs(model, data, "data")
    tolerance = _default_rtol(model, quantize) if rtol is None else rtol
    # recalibrate= works on the model's own statistics: every variable is put back afterwards.
    with probes.unchanged(model) if recalibrate else contextlib.nullcontext():
        if recalibrate:
            from bnseq.statistics.recalibration import recalibrate as recalibrate_statistics

            recalibrate_statistics(model, checking.call_input(model, checked), verbose=0)
        if quantize is None:
            call_input = checking.call_input(model, inputs)
            references = [checking.named(model, run(model, call_input)) for run in (probes.predicted, probes.infer)]
        else:
            call_input = checking.call_input(model, checked)
            references = [checking.named(model, probes.predicted(model, call_input, batch_size=32))]
        weak = checking.weakness(references[0])
        if chosen == "onnx":
            checking.check_onnx_names(model, references[0])
        if fold:
            target, decisions = folding.fold_with_report(model)
        else:
            target, decisions = model, fold_plan.fold_report(model)
        probes.infer(target, checking.call_input(target, inputs))  # Keras's ONNX exporter wants a called model
        target, renamed = checking.with_signature_names(target, chosen)
        names = checking.input_names(target)  # the artifact's input names; in the order of model.inputs
        staged = _staged_name(path, chosen)
        unfolded_latency = quantization = None
        try:
            runtimes.write(target, staged, chosen, quantize, checked, names, shown=path)
            precision = _lowest_precision(model)
            run = runtimes.loaded(runtime, staged, names, threads, chosen, safe_mode, path, inputs, precision)
            outputs = checking.paired(references[0], runtimes.in_batches(run, checked), chosen)
            max_abs, max_rel = min(checking.difference(reference, outputs) for reference in references)
            if quantize == quantizing.QUANTIZE_AWARE:
                quantization, latency = quantizing.quantize_aware_check(
                    references[0], outputs, staged, inputs, threads, run, chosen
                )
            elif quantize is not None:
                quantization, latency = quantizing.quantization(
                    quantize, target, references[0], outputs, inputs, names, threads, recalibrate, run
                )
            elif compare:
                with tempfile.TemporaryDirectory() as directory:
                    other = os.path.join(directory, "unfolded" + (os.path.splitext(path)[1] or ""))
                    probes.infer(model, checking.call_input(model, inputs))
                    runtimes.write(model, other, chosen)
                    run_unfolded = runtimes.loaded(
                        runtime, other, checking.input_names(model), threads, chosen, safe_mode, None, inputs
                    )
                    latency, unfolded_latency = runtimes.interleaved_latency(
                        [lambda: runtimes.timed(run)(inputs), lambda: runtimes.timed(run_unfolded)(inputs)]
                    )
            else:
                (latency,) = runtimes.interleaved_latency([lambda: runtimes.timed(run)(inputs)])
        except BaseException:
            runtimes.remove(staged)
            raise
    folded = sum(decision.folded for decision in decisions) if fold else 0
    kept = len(decisions) - folded
    if aware:  # the units' BatchNormalization layers fold in the export; the others stay (as int8 MUL and ADD)
        folded, kept = sum(getattr(layer, "batch_norm", None) is not None for layer in aware), len(decisions)
    report_fields = dict(
        format=chosen,
        size=runtimes.size(staged),
        folded=folded,
        kept=kept,
        max_abs=max_abs,
        max_rel=max_rel,
        latency=latency,
        unfolded_latency=unfolded_latency,
        rtol=tolerance,
        weak=weak,
        quantization=quantization,
    )
    failure = _failure(chosen, path, report_fields, tolerance, quantize, min_agreement, model, fold)
    if failure is not None:
        kept = runtimes.keep_failed(staged, path)
        report = ExportReport(path=kept, **report_fields)
        raise ToleranceError(f"{failure} The artifact is kept as '{kept}'; '{path}' was not written.", report)
    _move_into_place(staged, path)
    for old, new in renamed.items():
        notices.warn(
            f"A {chosen} signature cannot hold the input name '{old}': in '{path}' that input is named '{new}'.",
            UserWarning,
        )
    if weak:
        notices.warn(f"The export check of '{path}' is weak: {weak}", UserWarning)
    return ExportReport(path=path, **report_fields)


def _failure(chosen, path, fields, tolerance, quantize, min_agreement, model, fold):
    """Why the artifact fails its check, with advice that fits the cause; `None` when it passes."""
    quantization = fields["quantization"]
    if quantization is not None:
        advice = (
            "Recalibrate on representative data first (recalibrate=True, on the command line --recalibrate), "
            "pass data that covers what the model will see, or quantize='float16'."
        )
        against, runtime = "the float model", "LiteRT"
        if quantization.aware:
            against, runtime = "the quantize-aware model", {"litert": "LiteRT", "onnx": "ONNX"}[chosen]
            advice = (
                f"{runtime} rounds in integers where the quantize-aware model rounds in float, so outputs move by "
                "a step here and there; more than that means ranges its training has not settled (train it "
                "longer, with freeze_statistics_after=), or inputs far outside them (check on data= like the "
                "training data)."
            )
        if quantization.agreement is not None and not quantization.agreement >= min_agreement:
            return (
                f"The {quantization.kind} {runtime} export agrees with {against} on the top-1 class of "
                f"{quantization.agreement:.4f} of {quantization.examples} examples, less than "
                f"min_agreement={min_agreement:g}. {advice}"
            )
        if not quantization.mean_rel <= tolerance:
            return (
                f"The {quantization.kind} {runtime} export differs from {against} by a mean relative "
                f"{quantization.mean_rel:.3g}, more than rtol={tolerance:g}. {advice}"
            )
        return None
    if fields["max_rel"] <= tolerance:
        return None
    message = (
        f"The {chosen} export of '{path}' differs from the model by {fields['max_abs']:.3g} (relative "
        f"{fields['max_rel']:.3g}) in its runtime, more than rtol={tolerance:g}."
    )
    dtype = _lowest_precision(model)
    if dtype != "float32" and fields["max_rel"] <= RTOL[dtype]:  # within what the dtype explains
        return (
            f"{message} The model computes in {dtype}, whose rounding the runtime repeats in its own order: "
            "pass a larger rtol= if this is within what you need."
        )
    if fold:
        return (
            f"{message} Export with fold=False (on the command line --no-fold): if that passes, the fold is "
            "the cause (bnseq.fold_report(model) lists what it folded; please report it); if not, the "
            "exporter or the runtime is."
        )
    return f"{message} The model was exported as it is (fold=False): the exporter or the runtime is the cause."


def _check_target(path, chosen, source, overwrite):
    """Refuses a target that would destroy something: the model's own file, or a SavedModel directory in use."""
    if source is not None and isinstance(source, (str, os.PathLike)) and os.path.exists(path):
        if os.path.exists(os.fspath(source)) and os.path.samefile(os.fspath(source), path):
            raise ValueError(
                f"Refusing to export over the model's own file '{path}': the export is for inference only "
                "and would replace the trainable model. Choose another output path."
            )
    if chosen == "tf_saved_model":
        if os.path.isfile(path):
            raise ValueError(f"A SavedModel is a directory, and '{path}' is a file. Choose another output path.")
        if os.path.isdir(path) and os.listdir(path) and not overwrite:
            raise ValueError(
                f"The SavedModel directory '{path}' is not empty. Choose an empty or new directory, or pass "
                "overwrite=True (on the command line --overwrite) to replace what is there."
            )
    elif os.path.isdir(path):
        raise ValueError(f"'{path}' is a directory; a {chosen} export is a file. Choose another output path.")


def _format_of(path, format):
    if format is not None:
        if format not in runtimes.EXTRAS:
            raise ValueError(
                f"Unknown export format. Use one of {', '.join(sorted(runtimes.EXTRAS))}. Received: format={format!r}"
            )
        return format
    suffix = os.path.splitext(path)[1].lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    if suffix:
        raise ValueError(
            f"Cannot tell the export format from the suffix '{suffix}': use .onnx, .tflite, .keras, a "
            f"directory (a TensorFlow SavedModel), or format=. Received: path={path!r}"
        )
    return "tf_saved_model"


def _staged_name(path, chosen):
    """A fresh name in the target's folder (created if missing), with the suffix the exporter wants."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    root, suffix = os.path.splitext(os.path.basename(path))
    if chosen == "tf_saved_model":
        root, suffix = os.path.basename(os.path.normpath(path)), ""
    handle, name = tempfile.mkstemp(prefix=f".{root}.", suffix=f".partial{suffix}", dir=folder)
    os.close(handle)
    os.remove(name)  # the exporters write the file (or directory) themselves
    return name


def _move_into_place(staged, path):
    if os.path.isdir(path):  # a SavedModel directory: empty, or overwrite=True was checked
        shutil.rmtree(path)
    os.replace(staged, path)


def _lowest_precision(model):
    dtypes = {keras.backend.standardize_dtype(getattr(layer, "compute_dtype", None) or "float32")
              for layer in [model, *internals.inner_layers(model)]}
    for dtype in ("bfloat16", "float16"):
        if dtype in dtypes:
            return dtype
    return "float32"


def _default_rtol(model, quantize):
    if quantize is not None:
        return quantizing.QUANTIZED_RTOL[quantize]
    return RTOL[_lowest_precision(model)]
