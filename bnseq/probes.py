"""What this backend, on this machine, can compute: each probed once per process.

bnseq decides on plain values everywhere else (`deciding/`); the facts here
depend on the Keras backend and the CPU, not on the model, so they are measured
with a tiny computation instead of being assumed from a version number.

- `bias_add_is_sound()`: Keras 3.15's TensorFlow `ops.add` turns an add of a
  bias-shaped tensor into `tf.nn.bias_add`, guessing the layout from the input
  shape alone, so a channels_first bias can land on the last axis.
- `leaky_relu_fusion_is_sound()`: TensorFlow's graph optimizer, with oneDNN,
  fuses a convolution, its bias, an add and a LeakyReLU into one kernel that
  uses the LeakyRelu op's default slope (0.2) instead of the layer's: `predict`
  is wrong where the eager call is right.
- `unchanged(*layers)`: not a probe of the machine but what every check
  needs: run something on a user's model and leave every variable of it as
  it was (weights, statistics, seeds, counters, recurrent states).
- `largest_difference(expected, actual)`: the one measure every check
  reports, in which a NaN or an infinity is never a zero difference.
- `recorded_training_is_overridden(nested)`: Keras 3.0 to 3.15 run a layer
  that a functional model recorded as called with `training=False` in
  training mode when the model itself is called with `training=True`, as
  `fit` calls it (keras-team/keras#20285): the transfer-learning guide's
  `base(x, training=False)` and `BatchNormalization()(x, training=False)`
  both train statistics. Keras master keeps the recorded value.
- `channels_first_runs()`: TensorFlow has CPU kernels for channels_first (NCHW)
  convolutions and pooling only through oneDNN, which it turns on by default
  only on CPUs with AVX-512 (keras-team/keras#23650). Elsewhere `model(x)`,
  `predict` and `fit` raise `UnimplementedError`; the same graph compiled by
  XLA runs.
"""

import contextlib
import functools
import math
import os

import keras
import numpy as np

from bnseq import internals
from bnseq import kinds

ONEDNN_ISSUE = "https://github.com/keras-team/keras/issues/23650"


@functools.cache
def bias_add_is_sound():
    """Whether `ops.add` puts a `(1, C, 1, 1)` bias on axis 1 of `(1, C, 1, C)`."""
    probe = keras.ops.add(
        keras.ops.zeros((1, 2, 1, 2)),
        keras.ops.reshape(keras.ops.convert_to_tensor([0.0, 1.0]), (1, 2, 1, 1)),
    )
    return bool(np.allclose(keras.ops.convert_to_numpy(probe)[0, :, 0, 0], [0.0, 1.0]))


@functools.cache
def leaky_relu_fusion_is_sound():
    """Whether `Conv2D` (with bias) -> add -> LeakyReLU computes the same in a graph as eagerly.

    With oneDNN, TensorFlow's grappler remapper rewrites Conv2D + BiasAdd + Add +
    LeakyRelu into one `_FusedConv2D` that loses the slope (it applies the
    op's default, 0.2): at slope 0.01 a result 13% off, under `predict` and in
    every `tf.function`, while eager calls are right. The same class of defect
    as tensorflow/tensorflow#57515 (the fused op missing `leakyrelu_alpha`).
    Always `True` off TensorFlow.
    """
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf

    rng = np.random.default_rng(0)
    image = tf.constant(rng.normal(size=(1, 3, 3, 2)), tf.float32)
    other = tf.constant(rng.normal(size=(1, 3, 3, 2)), tf.float32)
    kernel = tf.constant(rng.normal(size=(1, 1, 2, 2)), tf.float32)
    bias = tf.constant([0.5, -0.5], tf.float32)

    def computation(image, other):
        features = tf.nn.bias_add(tf.nn.conv2d(image, kernel, 1, "VALID"), bias)
        return tf.nn.leaky_relu(features + other, alpha=0.5)

    eager = computation(image, other).numpy()
    graph = tf.function(computation, autograph=False)(image, other).numpy()
    return bool(np.allclose(eager, graph, rtol=1e-5, atol=1e-6))


@functools.cache
def recorded_training_is_overridden(nested=False):
    """Whether this Keras runs a recorded `training=False` in training mode when `fit` calls the model.

    `nested=False` probes `BatchNormalization()(x, training=False)` written in a
    functional model; `nested=True` probes a model called as `base(x,
    training=False)` inside another. The probe's own layers are named, so no
    automatic name of the user's layers moves; its statistics are its own.
    """
    inputs = keras.Input((1,), name="bnseq_probe_input")
    batch_norm = keras.layers.BatchNormalization(name="bnseq_probe_batch_norm")
    if nested:
        inner_input = keras.Input((1,), name="bnseq_probe_inner_input")
        inner = keras.Model(inner_input, batch_norm(inner_input), name="bnseq_probe_inner")
        model = keras.Model(inputs, inner(inputs, training=False), name="bnseq_probe")
    else:
        model = keras.Model(inputs, batch_norm(inputs, training=False), name="bnseq_probe")
    batch = np.array([[1.0], [3.0]], dtype="float32")
    # Inference mode with the initial statistics (mean 0, variance 1) gives the batch back;
    # training mode normalizes it to about -1 and 1.
    result = keras.ops.convert_to_numpy(model(batch, training=True))
    return not np.allclose(result, batch, atol=1e-2)


@functools.cache
def channels_first_runs():
    """Whether channels_first convolutions run outside XLA on this backend.

    Probes a 1x1 convolution and a transposed convolution in NCHW; on
    TensorFlow without oneDNN the first raises `UnimplementedError` and the
    second `InvalidArgumentError`. Always `True` on JAX and PyTorch.
    """
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf

    image, kernel = tf.zeros((1, 1, 2, 2)), tf.zeros((1, 1, 1, 1))
    try:
        tf.nn.conv2d(image, kernel, 1, "VALID", data_format="NCHW")
        tf.nn.conv2d_transpose(image, kernel, (1, 1, 2, 2), 1, data_format="NCHW")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def has_channels_first_layers(layer):
    """Whether `layer`, or any layer inside it (nested models and subclassed layers too), is channels_first.

    Its layers come from `internals.inner_layers` (private Keras API).
    """
    layers = [layer, *internals.inner_layers(layer)] if isinstance(layer, keras.Layer) else [layer]
    return any(getattr(each, "data_format", None) == "channels_first" for each in layers)


def needs_xla(model):
    """Whether `model` (or a layer) only runs here when compiled by XLA."""
    return not channels_first_runs() and has_channels_first_layers(model)


def infer(model, inputs, training=False):
    """`model(inputs, training=training)` as NumPy, on any machine (model or layer).

    Called eagerly, except where `needs_xla(model)`: then the same call runs
    compiled by XLA (`tf.function(jit_compile=True)`), which has its own
    channels_first kernels. The model's variables are left as they were
    (`unchanged`): a check runs it, nothing else.
    """
    with unchanged(model):
        return _infer(model, inputs, training)


def _infer(model, inputs, training=False):
    if needs_xla(model):
        import tensorflow as tf

        call = tf.function(lambda x: model(x, training=training), jit_compile=True)
        outputs = call(inputs)
    else:
        outputs = model(inputs, training=training)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)


def inference_step(model):
    """A callable that runs `model` on one batch as compiled inference, for timing it.

    Keras's compiled predict step (`predict_on_batch`: the graph `predict` runs, without the data
    pipeline `predict` builds on every call, which costs a small model 0.1 s a call on TensorFlow),
    or, where `needs_xla(model)`, the call compiled by XLA once. It returns the backend's tensors;
    equivalence checks use `predicted`, which runs `predict` itself.
    """
    if needs_xla(model):
        import tensorflow as tf

        return tf.function(lambda x: model(x, training=False), jit_compile=True)
    return model.predict_on_batch


def random_inputs(model, batch_size=2, seed=0):
    """A deterministic standard-normal batch for each of `model.inputs` (unknown sizes taken as 8), as a list."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal([batch_size] + [8 if size is None else size for size in tensor.shape[1:]]).astype(
            keras.backend.standardize_dtype(tensor.dtype)
        )
        for tensor in model.inputs
    ]


class Changes:
    """What `unchanged` put back: the paths of the variables that had changed (filled in on exit)."""

    def __init__(self):
        self.paths = []


def state_of(*layers):
    """Every variable a call of `layers` could change, once each.

    `layer.variables` (weights, moving statistics, counters made with
    `add_weight`, `SeedGenerator` states) and the carried states of stateful
    recurrent layers, which Keras keeps outside `variables` (`RNN.states`).
    """
    found = {}
    for layer in layers:
        for variable in layer.variables:
            found.setdefault(id(variable), variable)
        for each in [layer, *internals.inner_layers(layer)]:
            if isinstance(each, keras.layers.RNN) and getattr(each, "states", None) is not None:
                for variable in keras.tree.flatten(each.states):
                    if isinstance(variable, keras.Variable):
                        found.setdefault(id(variable), variable)
    return list(found.values())


def seeds_of(*layers):
    """The `keras.random.SeedGenerator` states among `state_of(layers)`: what a random layer draws from.

    Told by the name Keras gives the state variable of every SeedGenerator.
    """
    return [variable for variable in state_of(*layers) if variable.name == "seed_generator_state"]


def _value(variable):
    return np.array(keras.ops.convert_to_numpy(variable.value), copy=True)


@contextlib.contextmanager
def unchanged(*layers, keep=()):
    """Leave every variable of `layers` (see `state_of`) as it was on entry, except those in `keep`.

    Yields a `Changes`: on exit, the paths of the variables that had changed
    and were put back. A check that runs the user's model (a `predict`, a
    traced `call()` with a step counter, a stateful LSTM) so changes nothing.
    """
    keep = {id(variable) for variable in keep}
    saved = [(variable, _value(variable)) for variable in state_of(*layers) if id(variable) not in keep]
    changes = Changes()
    try:
        yield changes
    finally:
        for variable, value in saved:
            now = _value(variable)
            if now.shape != value.shape or not np.array_equal(now, value, equal_nan=now.dtype.kind == "f"):
                changes.paths.append(variable.path)
                variable.assign(value)


def largest_difference(expected, actual):
    """`(largest absolute difference, that over the largest absolute expected value)` over pairs of arrays.

    Infinite when either side holds a NaN or an infinity anywhere: a check
    cannot vouch for what it cannot compare (`max(0.0, nan)` is `0.0` in
    Python, which made a NaN pass as "no difference").

    Examples:
        >>> largest_difference([np.array([1.0, 2.0])], [np.array([1.0, 2.5])])
        (0.5, 0.25)
        >>> largest_difference([np.array([1.0, 2.0])], [np.array([1.0, np.nan])])
        (inf, inf)
    """
    largest = scale = 0.0
    for want, got in zip(expected, actual):
        want = np.asarray(want, np.float64)
        got = np.asarray(got, np.float64).reshape(want.shape)
        if not (np.all(np.isfinite(want)) and np.all(np.isfinite(got))):
            return math.inf, math.inf
        if want.size:
            largest = max(largest, float(np.max(np.abs(want - got))))
            scale = max(scale, float(np.max(np.abs(want))))
    return largest, largest / scale if scale else largest


def predicted(model, inputs, batch_size=None):
    """`model` on `inputs` as `predict` computes it, as NumPy.

    Compiled as Keras compiles `predict` (on TensorFlow a graph, which
    TensorFlow's optimizer rewrites: `leaky_relu_fusion_is_sound`), or by XLA
    where `needs_xla(model)`. Equivalences bnseq reports are measured with
    this, not only with eager calls. `batch_size=None` runs all of `inputs`
    as one batch. The model's variables are left as they were (`unchanged`).
    """
    with unchanged(model):
        return _predicted(model, inputs, batch_size)


def _predicted(model, inputs, batch_size):
    count = len(keras.tree.flatten(inputs)[0])
    batch_size = batch_size or count
    if needs_xla(model):
        parts = [
            _infer(model, keras.tree.map_structure(lambda x, start=start: x[start : start + batch_size], inputs))
            for start in range(0, count, batch_size)
        ]
        return keras.tree.map_structure(lambda *each: np.concatenate(each), *parts)
    outputs = model.predict(inputs, batch_size=batch_size, verbose=0)
    return keras.tree.map_structure(np.asarray, outputs)


_warned = set()


def channels_first_warning(layer):
    """The warning for a channels_first `layer` that cannot run here, once per process.

    Returns:
        str, or `None` when there is nothing (more) to say.
    """
    if getattr(layer, "data_format", None) != "channels_first":
        return None
    if channels_first_runs() or "channels_first" in _warned:
        return None
    _warned.add("channels_first")
    flag = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    setting = "TF_ENABLE_ONEDNN_OPTS is unset" if flag is None else f"TF_ENABLE_ONEDNN_OPTS={flag}"
    return (
        f"{kinds.describe(layer)} is channels_first, and TensorFlow on this CPU "
        "has no kernels for channels_first convolutions (they come with oneDNN, "
        f"which is off: {setting}, and TensorFlow turns it on "
        f"by default only on CPUs with AVX-512; {ONEDNN_ISSUE}). Eager calls such as `model(x)` "
        "fail here with UnimplementedError. bnseq.Sequential.compile() turns "
        "jit_compile='auto' into jit_compile=True for such a model, so fit, "
        "evaluate and predict run compiled by XLA. Other fixes: "
        "`model.compile(..., jit_compile=True)` for any model, "
        "TF_ENABLE_ONEDNN_OPTS=1 set before TensorFlow is imported, the JAX or "
        "PyTorch backend, or channels_last."
    )
