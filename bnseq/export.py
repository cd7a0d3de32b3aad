"""`bnseq.export`: fold, export through Keras's own `Model.export`, and check in the target runtime.

Deployment runtimes fuse BatchNormalization only in part (ONNX Runtime does not
fuse it after ConvTranspose, microsoft/onnxruntime#14270; tf2onnx leaves some
as Mul/Add, onnx/tensorflow-onnx#1079). `export` folds first (`bnseq.fold`),
writes the artifact with Keras's exporter, loads it in the runtime it is for
(ONNX Runtime, the LiteRT interpreter, `tf.saved_model.load`, Keras), runs it
on a sample and compares with the original model in inference mode.
"""

import dataclasses
import os
import statistics
import tempfile
import time

import keras
import numpy as np

from bnseq import files
from bnseq import fold as fold_module
from bnseq import notices
from bnseq import probes

FORMATS = {".onnx": "onnx", ".tflite": "litert", ".keras": "keras"}
EXTRAS = {
    "onnx": ("onnx", ["onnxruntime", "tf2onnx", "onnx"]),
    "litert": ("litert", ["ai_edge_litert"]),
    "tf_saved_model": ("tensorflow", ["tensorflow"]),
    "keras": (None, []),
}


class ToleranceError(ValueError):
    """The exported artifact, run in its runtime, differs from the model by more than the tolerance.

    Attributes:
        report: `ExportReport` of the export that was written.
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
            model in inference mode, on the sample.
        max_rel: float. `max_abs` over the largest absolute model output.
        latency: float. Median seconds per run of the artifact in its runtime
            on the sample.
        unfolded_latency: float or None. The same for an export of the model
            without folding (with `compare=True`), measured interleaved.
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

    def __str__(self):
        lines = [
            f"{self.format} {self.path} ({self.size:,} bytes)",
            f"BatchNormalization: {self.folded} folded, {self.kept} kept",
            f"in the runtime: largest difference {self.max_abs:.3g} (relative {self.max_rel:.3g})",
            f"latency: {self.latency * 1000:.3f} ms per run",
        ]
        if self.unfolded_latency is not None:
            lines[-1] += (
                f"; unfolded export {self.unfolded_latency * 1000:.3f} ms "
                f"(folded/unfolded {self.latency / self.unfolded_latency:.2f})"
            )
        return "\n".join(lines)


def export(model, path, *, format=None, fold=True, sample=None, safe_mode=True, compare=False, rtol=1e-4,
           threads=None):
    """Folds, exports with Keras's `Model.export`, and checks the artifact in its runtime.

    The format follows the path (`.onnx` for ONNX Runtime, `.tflite` for
    LiteRT, `.keras` for Keras, a path without a suffix for a TensorFlow
    SavedModel directory) unless `format=` says. The model is folded first
    (`bnseq.fold`, the report counts what was kept), exported, loaded in its
    runtime and run on `sample` (by default a deterministic standard-normal
    batch of 2 with the model's input shape, unknown sizes taken as 8); the
    outputs are compared with the original model's in inference mode.

    Tolerance: the largest absolute difference over the largest absolute
    output of the model must be at most `rtol` (1e-4 by default, for float32).

    Args:
        model: `keras.Model` or the path of a `.keras` file.
        path: str or path-like. Where to write.
        format: str, optional. `"onnx"`, `"litert"`, `"tf_saved_model"` or
            `"keras"`; from the path when `None`.
        fold: bool. Fold BatchNormalization first (the default).
        sample: array or list of arrays, optional. The inputs to check on.
        safe_mode: bool. Keras's `safe_mode` for loading a file.
        compare: bool. Also export the unfolded model (to a temporary place)
            and time both in the runtime.
        rtol: float. The tolerance.
        threads: int, optional. Threads for the runtime when timing (its own
            default when `None`).

    Returns:
        `ExportReport`.

    Raises:
        ImportError: if the runtime is not installed; the message names the
            bnseq extra to install.
        ToleranceError: a `ValueError`, if the difference exceeds `rtol` (the
            artifact is written; the error holds the report).
        ValueError: for an unknown format.

    Example:

    >>> model = bnseq.Sequential([keras.Input((4,)), keras.layers.Dense(3)], batch_norm=True)
    >>> import tempfile, os
    >>> report = bnseq.export(model, os.path.join(tempfile.mkdtemp(), "model.keras"))
    >>> report.format, report.folded, report.max_rel < 1e-5
    ('keras', 1, True)
    """
    model = files.as_model(model, safe_mode=safe_mode)
    path = os.fspath(path)
    chosen = _format_of(path, format)
    runtime = _runtime(chosen)
    inputs = _sample(model, sample)
    expected = keras.tree.flatten(probes.infer(model, _as_call_input(inputs)))
    if fold:
        target, decisions = fold_module.fold_with_report(model)
    else:
        target, decisions = model, fold_module.fold_report(model)
    probes.infer(target, _as_call_input(inputs))  # Keras's ONNX exporter wants a called model
    _write(target, path, chosen)
    run, outputs = _loaded(runtime, path, inputs, threads, chosen)
    actual = keras.tree.flatten(outputs)
    max_abs = scale = 0.0
    for a, b in zip(expected, actual):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64).reshape(np.shape(a))
        max_abs = max(max_abs, float(np.max(np.abs(a - b))))
        scale = max(scale, float(np.max(np.abs(a))))
    max_rel = max_abs / scale if scale else max_abs
    unfolded_latency = None
    if compare:
        with tempfile.TemporaryDirectory() as directory:
            other = os.path.join(directory, "unfolded" + (os.path.splitext(path)[1] or ""))
            probes.infer(model, _as_call_input(inputs))
            _write(model, other, chosen)
            run_unfolded, _ = _loaded(runtime, other, inputs, threads, chosen)
            latency, unfolded_latency = _interleaved_latency([run, run_unfolded])
    else:
        (latency,) = _interleaved_latency([run])
    folded = sum(decision.folded for decision in decisions) if fold else 0
    report = ExportReport(
        path=path,
        format=chosen,
        size=_size(path),
        folded=folded,
        kept=len(decisions) - folded,
        max_abs=max_abs,
        max_rel=max_rel,
        latency=latency,
        unfolded_latency=unfolded_latency,
    )
    if not max_rel <= rtol:
        raise ToleranceError(
            f"The {chosen} export '{path}' differs from the model by {max_abs:.3g} (relative "
            f"{max_rel:.3g}) in its runtime, more than rtol={rtol:g}. Look at the kept layers "
            "in bnseq.fold_report(model), or export with fold=False to see whether folding is the "
            "cause.",
            report,
        )
    return report


def _loaded(runtime, path, inputs, threads, chosen):
    """The artifact loaded in its runtime and run once: `(run, outputs)`; a clear error where it is refused.

    That first run is also the warm-up of the timing that follows.
    """
    try:
        run = runtime(path, inputs, threads)
        outputs = run()
    except Exception as error:  # each runtime has its own error classes
        raise ValueError(
            f"The {chosen} runtime cannot run '{path}', which Keras's exporter wrote: {notices.first_line(error)}"
        ) from error
    return run, outputs


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
    """The function that loads and runs an artifact; raises if its runtime is missing."""
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


def _write(model, path, chosen):
    if chosen == "keras":
        model.save(path)
        return
    try:
        model.export(path, format=chosen, verbose=False)
    except Exception as error:  # the converters raise their own error classes
        raise ValueError(
            f"Keras's {chosen} exporter cannot write '{path}': {notices.first_line(error)}"
        ) from error


def _onnx(path, inputs, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {spec.name: value for spec, value in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feed)


def _litert(path, inputs, threads):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    details = interpreter.get_input_details()
    for detail, value in zip(details, inputs):
        interpreter.resize_tensor_input(detail["index"], value.shape)
    interpreter.allocate_tensors()
    outputs = interpreter.get_output_details()

    def run():
        for detail, value in zip(details, inputs):
            interpreter.set_tensor(detail["index"], value)
        interpreter.invoke()
        return [interpreter.get_tensor(detail["index"]) for detail in outputs]

    return run


def _saved_model(path, inputs, threads):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    return lambda: [np.asarray(value) for value in keras.tree.flatten(loaded.serve(*inputs))]


def _keras(path, inputs, threads):
    loaded = keras.saving.load_model(path)
    return lambda: probes.predicted(loaded, _as_call_input(inputs))  # as a user runs it: predict


def _sample(model, sample):
    if sample is None:
        rng = np.random.default_rng(0)
        return [
            rng.standard_normal([2] + [8 if size is None else size for size in tensor.shape[1:]]).astype(
                keras.backend.standardize_dtype(tensor.dtype)
            )
            for tensor in model.inputs
        ]
    return [np.asarray(each) for each in (sample if isinstance(sample, (list, tuple)) else [sample])]


def _as_call_input(inputs):
    return inputs[0] if len(inputs) == 1 else list(inputs)


def _interleaved_latency(runs, rounds=7, calls=5):
    """Median seconds per call of each run, rounds interleaved in rotating order.

    Every run has been called once already (`_loaded`), so there is no warm-up here.
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
