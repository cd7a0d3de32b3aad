"""`bnseq.export`: fold, export through Keras's own `Model.export`, and check in the target runtime.

Deployment runtimes fuse BatchNormalization only in part (ONNX Runtime does not
fuse it after ConvTranspose, microsoft/onnxruntime#14270; tf2onnx leaves some
as Mul/Add, onnx/tensorflow-onnx#1079; the LiteRT converter folds it only
after Conv2D, DepthwiseConv2D and FullyConnected). `export` folds first
(`bnseq.fold`), writes the artifact with Keras's exporter next to its target,
loads it in the runtime it is for (ONNX Runtime, the LiteRT interpreter,
`tf.saved_model.load`, Keras), runs it on a sample, compares with the model,
and only then moves it into place.

The check pairs inputs and outputs by name, never by position: the model's
input tensors' names are the artifact's input names in every format, and its
outputs are `output_0`, `output_1`, ... (or the keys of a dict of outputs).
A runtime lists them in an order of its own (LiteRT's interpreter lists a
two-input model's inputs as `[b, a]`).
"""

import contextlib
import dataclasses
import os
import re
import shutil
import statistics
import tempfile
import time

import keras
import numpy as np

from bnseq import internals
from bnseq import notices
from bnseq import probes
from bnseq.changing import folding
from bnseq.reading import files

FORMATS = {".onnx": "onnx", ".tflite": "litert", ".keras": "keras"}
EXTRAS = {
    "onnx": ("onnx", ["onnxruntime", "tf2onnx", "onnx"]),
    "litert": ("litert", ["ai_edge_litert"]),
    "tf_saved_model": ("tensorflow", ["tensorflow"]),
    "keras": (None, []),
}
# Default tolerances, relative to the largest output. By the lowest-precision
# compute dtype in the model: float16 keeps 11 significant bits (a rounding
# step of 1e-3), bfloat16 8 (8e-3), and the runtime rounds in its own order.
RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# For quantized LiteRT exports, of the mean absolute difference over the mean
# absolute output on `data` (int8 has 256 levels per tensor).
QUANTIZED_RTOL = {"float16": 1e-2, "int8": 0.1}
# How many examples of `data` calibrate int8 (the converter's documentation
# suggests a few hundred), one at a time.
CALIBRATION_EXAMPLES = 300
FAILED = ".failed-check"


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
        if quantization is not None:
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
    _check_quantize(quantize, chosen, data, recalibrate)
    runtime = _runtime(chosen)
    inputs = probes.random_inputs(model) if sample is None else _flat_inputs(model, sample, "sample")
    checked = inputs if quantize is None else _flat_inputs(model, data, "data")
    tolerance = _default_rtol(model, quantize) if rtol is None else rtol
    with _statistics_restored(model, recalibrate):
        if recalibrate:
            from bnseq.statistics.recalibration import recalibrate as recalibrate_statistics

            recalibrate_statistics(model, _call_input(model, checked), verbose=0)
        if quantize is None:
            call_input = _call_input(model, inputs)
            references = [_named(model, run(model, call_input)) for run in (probes.predicted, probes.infer)]
        else:
            references = [_named(model, probes.predicted(model, _call_input(model, checked), batch_size=32))]
        weak = _weakness(references[0])
        if chosen == "onnx":
            _check_onnx_names(model, references[0])
        if fold:
            target, decisions = folding.fold_with_report(model)
        else:
            target, decisions = model, folding.fold_report(model)
        probes.infer(target, _call_input(target, inputs))  # Keras's ONNX exporter wants a called model
        names = _input_names(target)  # the artifact's input names; in the order of model.inputs
        staged = _staged_name(path, chosen)
        unfolded_latency = quantization = None
        try:
            _write(target, staged, chosen, quantize, checked, names, shown=path)
            run = _loaded(runtime, staged, names, threads, chosen, safe_mode, path, inputs, _lowest_precision(model))
            outputs = _paired(references[0], _in_batches(run, checked), chosen)
            max_abs, max_rel = min(_difference(reference, outputs) for reference in references)
            if quantize is not None:
                quantization, latency = _quantization(
                    quantize, target, references[0], outputs, inputs, names, threads, recalibrate, run
                )
            elif compare:
                with tempfile.TemporaryDirectory() as directory:
                    other = os.path.join(directory, "unfolded" + (os.path.splitext(path)[1] or ""))
                    probes.infer(model, _call_input(model, inputs))
                    _write(model, other, chosen)
                    run_unfolded = _loaded(
                        runtime, other, _input_names(model), threads, chosen, safe_mode, None, inputs
                    )
                    latency, unfolded_latency = _interleaved_latency(
                        [lambda: run(inputs), lambda: run_unfolded(inputs)]
                    )
            else:
                (latency,) = _interleaved_latency([lambda: run(inputs)])
        except BaseException:
            _remove(staged)
            raise
    folded = sum(decision.folded for decision in decisions) if fold else 0
    report_fields = dict(
        format=chosen,
        size=_size(staged),
        folded=folded,
        kept=len(decisions) - folded,
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
        kept = _keep_failed(staged, path)
        report = ExportReport(path=kept, **report_fields)
        raise ToleranceError(f"{failure} The artifact is kept as '{kept}'; '{path}' was not written.", report)
    _move_into_place(staged, path)
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
        if quantization.agreement is not None and not quantization.agreement >= min_agreement:
            return (
                f"The {quantization.kind} LiteRT export agrees with the float model on the top-1 class of "
                f"{quantization.agreement:.4f} of {quantization.examples} examples, less than "
                f"min_agreement={min_agreement:g}. {advice}"
            )
        if not quantization.mean_rel <= tolerance:
            return (
                f"The {quantization.kind} LiteRT export differs from the float model by a mean relative "
                f"{quantization.mean_rel:.3g} on data, more than rtol={tolerance:g}. {advice}"
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


def _check_onnx_names(model, expected):
    clashes = sorted(set(expected) & set(_input_names(model)))
    if clashes:
        raise ValueError(
            f"The model has an output and an input both named {clashes[0]!r}, which Keras's ONNX exporter "
            "(tf2onnx) cannot write ('graph input not exist'). Rename the output's key or the keras.Input."
        )


def _check_quantize(quantize, chosen, data, recalibrate):
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


def _format_of(path, format):
    if format is not None:
        if format not in EXTRAS:
            raise ValueError(
                f"Unknown export format. Use one of {', '.join(sorted(EXTRAS))}. Received: format={format!r}"
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


def _runtime(chosen):
    """The function that loads an artifact and returns its runner; raises if its runtime is missing."""
    extra, modules = EXTRAS[chosen]
    for module in modules:
        try:
            __import__(module)
        except ImportError as error:
            raise ImportError(
                f"Exporting to {chosen} and checking it needs the '{module}' package, which is not "
                f"installed. Install bnseq's {extra} extra: pip install 'bnseq[{extra}]' "
                f"(from a clone: pip install '.[{extra}]')."
            ) from error
    if chosen != "keras" and keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"bnseq.export to {chosen} goes through Keras's TensorFlow exporters; this process runs "
            f"the {keras.backend.backend()} backend. Set KERAS_BACKEND=tensorflow, or export to .keras."
        )
    return {"onnx": _onnx, "litert": _litert, "tf_saved_model": _saved_model, "keras": _keras}[chosen]


# Files: written next to the target, moved into place after the check.


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


def _keep_failed(staged, path):
    root, suffix = os.path.splitext(os.path.normpath(path))
    if os.path.isdir(staged):
        root, suffix = os.path.normpath(path), ""
    kept = root + FAILED + suffix
    _remove(kept)
    os.replace(staged, kept)
    return kept


def _remove(name):
    if os.path.isdir(name):
        shutil.rmtree(name, ignore_errors=True)
    elif os.path.exists(name):
        os.remove(name)


def _write(model, path, chosen, quantize=None, data=None, names=None, shown=None):
    """Writes `model` to `path` (a temporary name; errors name `shown`, the target, instead)."""
    if chosen == "keras":
        model.save(path)
        return
    options = {} if quantize is None else _converter_options(quantize, data, names)
    try:
        model.export(path, format=chosen, verbose=False, **options)
    except Exception as error:  # the converters raise their own error classes
        if quantize is not None and _UNSUPPORTED.search(str(error)):
            raise ValueError(_quantization_refused(model, quantize, error)) from error
        raise ValueError(
            f"Keras's {chosen} exporter cannot write '{shown or path}': {notices.first_line(error)}"
        ) from error


def _converter_options(quantize, data, names):
    """The TFLite converter's settings, passed through Keras's `Model.export(format="litert", ...)`."""
    import tensorflow as tf

    if quantize == "float16":
        return {"optimizations": [tf.lite.Optimize.DEFAULT], "target_spec": {"supported_types": [tf.float16]}}

    def representative():
        for index in range(min(len(data[0]), CALIBRATION_EXAMPLES)):
            yield {name: each[index : index + 1] for name, each in zip(names, data)}

    return {
        "optimizations": [tf.lite.Optimize.DEFAULT],
        "representative_dataset": representative,
        # Only int8 kernels: the converter refuses an operation without one instead of leaving it in float.
        "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
        "inference_input_type": tf.int8,
        "inference_output_type": tf.int8,
    }


_UNSUPPORTED = re.compile(r"neither a custom op nor a flex op|not supported|failed to legalize|unsupported", re.I)


def _quantization_refused(model, quantize, error):
    text = str(error)
    # The converter's locations name the layer's scope: "sequential_1/odd_erf_1/Erf@...".
    layers = [
        layer.name
        for layer in internals.inner_layers(model)
        if not getattr(layer, "layers", None) and re.search(rf"(?<!\w){re.escape(layer.name)}(_\d+)?/", text)
    ]
    operations = sorted(set(re.findall(r"'(tf\.\w+|tfl\.\w+)' op", text)))
    where = f" in layer {', '.join(layers[-3:])}" if layers else ""
    what = f" ({', '.join(operations)})" if operations else ""
    return (
        f"The LiteRT converter cannot quantize this model to {quantize}: an operation{what}{where} has no "
        f"{quantize} kernel or cannot be quantized. Export without quantize=, or with quantize='float16'. "
        f"The converter said: {notices.first_line(error)}"
    )


# Inputs and outputs: flat lists in the order of `model.inputs`, outputs by name.


def _input_names(model):
    return [tensor.name for tensor in model.inputs]


def _input_structure(model):
    try:
        return model.input  # a Functional's own structure: a dict, a list or one tensor
    except AttributeError:  # a Sequential that was never called
        return model.inputs[0] if len(model.inputs) == 1 else list(model.inputs)


def _call_input(model, flat):
    return keras.tree.pack_sequence_as(_input_structure(model), list(flat))


def _flat_inputs(model, value, what):
    """`value` (array, list or dict) as a list in the order of `model.inputs`, cast and shape-checked."""
    tensors = model.inputs
    names = _input_names(model)
    structure = _input_structure(model)
    if isinstance(value, dict) or hasattr(value, "files"):  # a dict, or NumPy's NpzFile
        keyed = {key: value[key] for key in (value.files if hasattr(value, "files") else value)}
        # A model built on a dict of inputs takes its own keys too (Keras warns when they differ from the names).
        aliases = {key: tensor.name for key, tensor in structure.items()} if isinstance(structure, dict) else {}
        by_name = {aliases.get(key, key): array for key, array in keyed.items()}
        if len(keyed) == 1 and len(names) == 1:
            by_name = {names[0]: next(iter(keyed.values()))}
        if set(by_name) != set(names):
            keys = sorted(aliases) or names
            raise ValueError(
                f"The {what} must have one array per model input, keyed by the input's name: "
                f"{', '.join(map(repr, keys))}. Received keys: {', '.join(map(repr, keyed))}"
            )
        arrays = [by_name[name] for name in names]
    elif isinstance(value, (list, tuple)):
        arrays = list(value)
    else:
        arrays = [value]
    if len(arrays) != len(tensors):
        raise ValueError(
            f"The model takes {len(tensors)} inputs ({', '.join(names)}); the {what} has {len(arrays)}. Pass a "
            "list in that order, or a dict keyed by those names."
        )
    flat = []
    for name, tensor, array in zip(names, tensors, arrays):
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        array = np.asarray(keras.ops.convert_to_numpy(array) if not isinstance(array, np.ndarray) else array)
        expected = tuple(tensor.shape)
        if array.ndim != len(expected) or any(
            size is not None and size != got for size, got in zip(expected[1:], array.shape[1:])
        ):
            shape = "(batch, " + ", ".join("?" if size is None else str(size) for size in expected[1:]) + ")"
            raise ValueError(
                f"The {what} for input '{name}' has shape {array.shape}; the model takes {shape}."
            )
        if len(array) == 0:
            raise ValueError(f"The {what} for input '{name}' is empty.")
        flat.append(array.astype(dtype, copy=False))
    if len({len(array) for array in flat}) > 1:
        raise ValueError(
            f"The {what}'s arrays have different numbers of examples: "
            + ", ".join(f"{name} {len(array)}" for name, array in zip(names, flat))
        )
    return flat


def _named(model, outputs):
    """The model's outputs as `{name: array}` in flatten order: a dict's keys, or `output_0`, `output_1`, ..."""
    if isinstance(outputs, dict):
        return {key: np.asarray(outputs[key]) for key in sorted(outputs)}
    return {f"output_{index}": np.asarray(each) for index, each in enumerate(keras.tree.flatten(outputs))}


def _paired(expected, produced, chosen):
    """`produced` (a list of `(name, array)` in the runtime's order) keyed by the names in `expected`."""
    by_name = {re.sub(r":\d+$", "", name): array for name, array in produced}
    if set(expected) <= set(by_name):
        return {name: by_name[name] for name in expected}
    if len(produced) == len(expected) and (len(expected) == 1 or chosen == "onnx"):
        # One output; or tf2onnx's names (Identity, Identity_1, ...), listed in the model's output order.
        return {name: array for name, (_, array) in zip(expected, produced)}
    raise ValueError(
        f"The {chosen} artifact's outputs ({', '.join(name for name, _ in produced)}) cannot be matched with "
        f"the model's ({', '.join(expected)})."
    )


def _matched_inputs(names, available, chosen):
    """`{model input name: runtime input name}`."""
    plain = {re.sub(r":\d+$", "", name): name for name in available}
    if set(names) <= set(plain):
        return {name: plain[name] for name in names}
    if len(names) == len(available) == 1:
        return {names[0]: available[0]}
    raise ValueError(
        f"The {chosen} artifact's inputs ({', '.join(available)}) cannot be matched with the model's "
        f"({', '.join(names)}) by name."
    )


def _difference(expected, actual):
    max_abs = scale = 0.0
    for name, a in expected.items():
        a = np.asarray(a, np.float64)
        b = np.asarray(actual[name], np.float64).reshape(np.shape(a))
        max_abs = max(max_abs, float(np.max(np.abs(a - b))))
        scale = max(scale, float(np.max(np.abs(a))))
    return max_abs, max_abs / scale if scale else max_abs


def _weakness(expected):
    """Why a check on these outputs says little, or `None`."""
    arrays = [np.asarray(each, np.float64) for each in expected.values()]
    if all(not np.any(each) for each in arrays):
        return (
            "the model's outputs on the sample are all zero. Pass sample= with real inputs (on the command "
            "line --sample FILE.npy or .npz) for a check that can fail."
        )
    if all(len(each) > 1 and np.all(each == each[:1]) for each in arrays):
        return (
            "the model gives the same outputs for every example of the sample. Pass sample= with real inputs "
            "(on the command line --sample FILE.npy or .npz) for a check that can fail."
        )
    return None


# Runtimes: each returns `run(flat_inputs)` -> list of (name, array) in the runtime's own order.


def _loaded(runtime, staged, names, threads, chosen, safe_mode, path, inputs, precision="float32"):
    """The artifact loaded in its runtime and run once on `inputs` (also the timing's warm-up).

    Where the runtime refuses it: a clear error, and the artifact kept under a
    `.failed-check` name (a temporary one, `path=None`, is left to its caller).
    """
    try:
        run = runtime(staged, names, threads, safe_mode=safe_mode)
        run(inputs)
    except Exception as error:  # each runtime has its own error classes
        kept = staged if path is None else _keep_failed(staged, path)
        hint = ""
        if chosen == "litert" and precision != "float32" and "Flex" in str(error):
            hint = (
                f" The model computes in {precision}, which Keras's LiteRT export writes as TensorFlow ops that "
                "the LiteRT interpreter lacks: export a float32 copy of the model instead (LiteRT computes in "
                "float16 itself with quantize='float16')."
            )
        raise ValueError(
            f"The {chosen} runtime cannot run the export of '{path or staged}' that Keras's exporter wrote "
            f"(kept as '{kept}'): {notices.first_line(error)}{hint}"
        ) from error
    return run


def _onnx(path, names, threads, **_):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    matched = _matched_inputs(names, [spec.name for spec in session.get_inputs()], "onnx")
    outputs = [spec.name for spec in session.get_outputs()]

    def run(flat):
        values = session.run(None, {matched[name]: value for name, value in zip(names, flat)})
        return list(zip(outputs, values))

    return run


def _litert(path, names, threads, **_):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    runner = interpreter.get_signature_runner()  # inputs and outputs by name, resized to what is fed
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    matched = _matched_inputs(names, list(inputs), "litert")

    def run(flat):
        feed = {matched[name]: _quantized(value, inputs[matched[name]]) for name, value in zip(names, flat)}
        results = runner(**feed)
        return [(name, _dequantized(results[name], outputs[name])) for name in outputs]

    return run


def _in_batches(run, flat, size=256):
    """`run` over `flat` a batch at a time, the outputs concatenated in the runtime's order."""
    parts = [run([each[start : start + size] for each in flat]) for start in range(0, len(flat[0]), size)]
    return [(name, np.concatenate([part[index][1] for part in parts])) for index, (name, _) in enumerate(parts[0])]


def _quantized(value, detail):
    """A float input as a LiteRT input tensor takes it: quantized by its scale and zero point if integer."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind in "iu" and scale:
        limits = np.iinfo(dtype)
        return np.clip(np.round(value / scale + zero_point), limits.min, limits.max).astype(dtype)
    return value.astype(dtype, copy=False)


def _dequantized(value, detail):
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind in "iu" and scale:
        return (value.astype(np.float32) - zero_point) * scale
    return value


def _saved_model(path, names, threads, **_):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    matched = _matched_inputs(names, list(serve.structured_input_signature[1]), "tf_saved_model")

    def run(flat):
        results = serve(**{matched[name]: tf.constant(value) for name, value in zip(names, flat)})
        return [(name, np.asarray(value)) for name, value in results.items()]

    return run


def _keras(path, names, threads, *, safe_mode=True):
    loaded = keras.saving.load_model(path, safe_mode=safe_mode)

    def run(flat):  # as a user runs it: predict
        return list(_named(loaded, probes.predicted(loaded, _call_input(loaded, flat))).items())

    return run


# Quantization.


def _quantization(kind, target, expected, outputs, inputs, names, threads, recalibrate, run):
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
        _write(target, other, "litert")
        run_float = _loaded(_litert, other, names, threads, "litert", True, None, inputs)
        latency, float_latency = _interleaved_latency([lambda: run(inputs), lambda: run_float(inputs)])
        float_size = _size(other)
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


@contextlib.contextmanager
def _statistics_restored(model, active):
    """With `active`, puts every variable of `model` back as it was afterwards (recalibrate changes some)."""
    if not active:
        yield
        return
    saved = [(variable, keras.ops.convert_to_numpy(variable)) for variable in model.variables]
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


# Dtypes and layers.


def _lowest_precision(model):
    dtypes = {keras.backend.standardize_dtype(getattr(layer, "compute_dtype", None) or "float32")
              for layer in [model, *internals.inner_layers(model)]}
    for dtype in ("bfloat16", "float16"):
        if dtype in dtypes:
            return dtype
    return "float32"


def _default_rtol(model, quantize):
    if quantize is not None:
        return QUANTIZED_RTOL[quantize]
    return RTOL[_lowest_precision(model)]


def _interleaved_latency(runs, rounds=7, calls=5):
    """Median seconds per call of each run, rounds interleaved in rotating order.

    Every run has been called once already, so there is no warm-up here.
    """
    times = [[] for _ in runs]
    for round_index in range(rounds):
        order = list(range(len(runs)))
        shift = round_index % len(runs)
        for index in order[shift:] + order[:shift]:
            start = time.perf_counter()
            for _ in range(calls):
                runs[index]()
            times[index].append((time.perf_counter() - start) / calls)
    return [statistics.median(each) for each in times]


def _size(path):
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
        )
    return os.path.getsize(path)
