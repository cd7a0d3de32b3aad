"""Writing an artifact with Keras's own exporters, and loading it in the runtime it is for.

Each loader returns `run(flat_inputs) -> {output name: array}`: ONNX Runtime,
the LiteRT interpreter (int8 inputs and outputs quantized and dequantized by
the tensor's own scale), `tf.saved_model.load`, and Keras itself for `.keras`
(run as `predict` runs it). The LiteRT converter's options for int8 and
float16 pass through `Model.export`.
"""

import os
import re
import shutil
import statistics
import time

import keras
import numpy as np

from bnseq import internals
from bnseq import notices
from bnseq import probes
from bnseq.exporting import checking

# How many examples of `data` calibrate int8 (the converter's documentation
# suggests a few hundred), one at a time.
CALIBRATION_EXAMPLES = 300

EXTRAS = {
    "onnx": ("onnx", ["onnxruntime", "tf2onnx", "onnx"]),
    "litert": ("litert", ["ai_edge_litert"]),
    "tf_saved_model": ("tensorflow", ["tensorflow"]),
    "keras": (None, []),
}
FAILED = ".failed-check"


def runtime(chosen):
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
    return {"onnx": run_onnx, "litert": run_litert, "tf_saved_model": run_saved_model, "keras": run_keras}[chosen]


def write(model, path, chosen, quantize=None, data=None, names=None, shown=None):
    """Writes `model` to `path` (a temporary name; errors name `shown`, the target, instead)."""
    if chosen == "keras":
        model.save(path)
        return
    options = {} if quantize is None or chosen != "litert" else _converter_options(quantize, data, names)
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
    if quantize == "quantize-aware":
        # The ranges come from the model's FakeQuant ops; what has none (a layer left in float) stays float.
        return {"optimizations": [tf.lite.Optimize.DEFAULT], "inference_input_type": tf.int8,
                "inference_output_type": tf.int8}

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


def loaded(runtime, staged, names, threads, chosen, safe_mode, path, inputs, precision="float32"):
    """The artifact loaded in its runtime and run once on `inputs` (also the timing's warm-up).

    Where the runtime refuses it: a clear error, and the artifact kept under a
    `.failed-check` name (a temporary one, `path=None`, is left to its caller).
    """
    try:
        run = runtime(staged, names, threads, safe_mode=safe_mode)
        run(inputs)
    except Exception as error:  # each runtime has its own error classes
        kept = staged if path is None else keep_failed(staged, path)
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


def run_onnx(path, names, threads, **_):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    matched = checking.matched_inputs(names, [spec.name for spec in session.get_inputs()], "onnx")
    outputs = [spec.name for spec in session.get_outputs()]

    def run(flat):
        values = session.run(None, {matched[name]: value for name, value in zip(names, flat)})
        return list(zip(outputs, values))

    return run


def run_litert(path, names, threads, **_):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    runner = interpreter.get_signature_runner()  # inputs and outputs by name, resized to what is fed
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    matched = checking.matched_inputs(names, list(inputs), "litert")

    def run(flat):
        feed = {matched[name]: _quantized(value, inputs[matched[name]]) for name, value in zip(names, flat)}
        results = runner(**feed)
        return [(name, _dequantized(results[name], outputs[name])) for name in outputs]

    return run


def _operators(path):
    """Each operator of a `.tflite` file: (name, dtypes of its inputs, dtypes of its outputs).

    LiteRT's interpreter has no public list of operators: `_get_ops_details`
    (checked on ai-edge-litert 2.3) is what its own analyzer reads.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    tensors = {detail["index"]: np.dtype(detail["dtype"]).name for detail in interpreter.get_tensor_details()}
    return [
        (op["op_name"], [tensors[i] for i in op["inputs"] if i >= 0], [tensors[i] for i in op["outputs"]])
        for op in interpreter._get_ops_details()
    ]


def float_operators(path):
    """The operators of a `.tflite` file that compute in float (a DEQUANTIZE into float excepted)."""
    return [
        name for name, inputs, outputs in _operators(path)
        if name not in ("DEQUANTIZE", "QUANTIZE", "DELEGATE") and any(dtype.startswith("float") for dtype in outputs)
    ]


def output_scales(path):
    """`(output name, the scale of its int8 levels)` in the runner's order (0.0 for a float output)."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner()
    return [(name, float(detail["quantization"][0])) for name, detail in runner.get_output_details().items()]


def in_batches(run, flat, size=256):
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


def run_saved_model(path, names, threads, **_):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    matched = checking.matched_inputs(names, list(serve.structured_input_signature[1]), "tf_saved_model")

    def run(flat):
        results = serve(**{matched[name]: tf.constant(value) for name, value in zip(names, flat)})
        return [(name, np.asarray(value)) for name, value in results.items()]

    return run


def run_keras(path, names, threads, *, safe_mode=True):
    loaded = keras.saving.load_model(path, safe_mode=safe_mode)

    def run(flat):  # as a user runs it: predict
        return list(checking.named(loaded, probes.predicted(loaded, checking.call_input(loaded, flat))).items())

    step = probes.inference_step(loaded)
    run.timed = lambda flat: step(checking.call_input(loaded, flat))  # the latency: inference, not predict's pipeline
    return run


def timed(run):
    """What to time of a runtime's `run`: the runtime's inference (Keras's has its own, `run_keras`)."""
    return getattr(run, "timed", run)


def interleaved_latency(runs, rounds=7, calls=5):
    """Median seconds per call of each run, rounds interleaved in rotating order.

    Every run has been called once already, so there is no warm-up here.
    """
    return [statistics.median(each) for each in interleaved_times(runs, rounds, calls)]


def interleaved_times(runs, rounds, calls=1):
    """Seconds per call of each run, one figure per round (the mean of `calls` calls).

    Every round runs each once, in an order that rotates from round to round,
    so that a slow moment of a shared machine falls on all of them alike.
    `benchmarks/common.py` times its candidates with this too.
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
    return times


def size(path):
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
        )
    return os.path.getsize(path)


def keep_failed(staged, path):
    root, suffix = os.path.splitext(os.path.normpath(path))
    if os.path.isdir(staged):
        root, suffix = os.path.normpath(path), ""
    kept = root + FAILED + suffix
    remove(kept)
    os.replace(staged, kept)
    return kept


def remove(name):
    if os.path.isdir(name):
        shutil.rmtree(name, ignore_errors=True)
    elif os.path.exists(name):
        os.remove(name)
