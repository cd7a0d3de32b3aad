"""The steps of `segments.py` as compiled functions, and what runs inside them.

`Function(step)` runs a step's calls on its input tensors, in inference mode,
and returns the cut it keeps and the per-channel moments of the inputs it
measures (one for each of `step.measured`). It is compiled as Keras compiles `predict`; `_compiled` is the one
place that differs by backend.
"""

import contextlib
import functools
import inspect

import keras

from bnseq import internals
from bnseq.reading import graph as graph_module


class Function:
    """A `_Step` as a function of its input tensors, compiled for the backend."""

    def __init__(self, step, jit_compile):
        self.step = step
        self.capture = None
        # A partial, not the bound method: TensorFlow counts traces per code object, and would warn
        # of "excessive retracing" across the steps of one model, each traced once.
        run = functools.partial(Function._run, self)
        self.compiled = _compiled(run, step.calls + [call for call, _ in step.probes], jit_compile)

    def __call__(self, inputs):
        return self.compiled(inputs)

    def _run(self, inputs):
        values = dict(zip(self.step.inputs, inputs))
        for call in self.step.calls:
            execute(call, values)
        moments = [
            _moments(values[ref], layer, internals.keras_mask(values[ref])) for layer, ref in self.step.targets
        ]
        for call, layers in self.step.probes:
            with self.capture.recording(layers) as seen:
                execute(call, dict(values), keep=False)
            for layer in layers:
                parts = [_moments(each, layer, mask) for each, mask in seen[id(layer)]]
                moments.append(_pooled_moments(parts) if parts else _no_moments(layer))
        return [values[ref] for ref in self.step.keep], moments


def execute(call, values, keep=True):
    """Run one call on the tensors in `values` (by `Ref`), in inference mode."""

    def value_of(item):
        return values[item] if isinstance(item, graph_module.Ref) else item

    args = keras.tree.map_structure(value_of, call.args)
    kwargs = keras.tree.map_structure(value_of, call.kwargs)
    if _takes_training(call.operation):
        kwargs["training"] = False  # as a functional model called with training=False does
    result = call.operation(*args, **kwargs)
    if not keep:
        return
    flat = keras.tree.flatten(result)
    if len(flat) == len(call.outputs):
        values.update(zip(call.outputs, flat))
    else:  # a layer of a Sequential model returning a structure: one Ref for all of it
        values[call.outputs[0]] = result


_TAKES_TRAINING = {}


def _takes_training(operation):
    kind = type(operation)
    if kind not in _TAKES_TRAINING:
        try:
            parameters = inspect.signature(operation.call).parameters
        except (AttributeError, TypeError, ValueError):
            parameters = {}
        _TAKES_TRAINING[kind] = "training" in parameters
    return _TAKES_TRAINING[kind]


def _moments(x, layer, mask=None):
    """(count, mean, sum of squared deviations) per channel of `layer.axis`, in float32 or wider.

    With a Keras `mask` (one axis less than `x`, broadcast over the last), only
    the positions it keeps count, as Keras's BatchNormalization computes masked
    batch statistics.
    """
    dtype = "float64" if keras.backend.standardize_dtype(x.dtype) == "float64" else "float32"
    x = keras.ops.cast(x, dtype)
    rank = len(x.shape)
    axis = layer.axis % rank
    others = [each for each in range(rank) if each != axis]
    if mask is None:
        mean = keras.ops.mean(x, axis=others, keepdims=True)
        m2 = keras.ops.sum(keras.ops.square(x - mean), axis=others)
        count = keras.ops.size(x) // keras.ops.shape(x)[axis]
        return count, keras.ops.reshape(mean, (-1,)), m2
    if axis != rank - 1 or len(mask.shape) != rank - 1:
        raise ValueError(
            f"BatchNormalization '{layer.name}' takes a masked input (shape {tuple(x.shape)}, mask shape "
            f"{tuple(mask.shape)}) on axis {layer.axis}: Keras broadcasts a mask over the last axis only, "
            "so recalibrate counts masked positions only when the channels are last. Normalize the last "
            "axis, or drop the mask before the layer."
        )
    keep = keras.ops.cast(keras.ops.expand_dims(mask, -1), dtype)
    count = keras.ops.sum(keep)
    total = keras.ops.sum(x * keep, axis=others, keepdims=True)
    mean = total / keras.ops.maximum(count, 1.0)
    m2 = keras.ops.sum(keras.ops.square((x - mean) * keep), axis=others)
    return keras.ops.cast(count, "int64"), keras.ops.reshape(mean, (-1,)), m2


def _no_moments(layer):
    """The moments of a layer the call did not reach: no samples (statistics left as they are)."""
    zeros = keras.ops.zeros(keras.ops.shape(layer.moving_mean), "float32")
    return keras.ops.convert_to_tensor(0, "int32"), zeros, zeros


def _pooled_moments(parts):
    """The moments of several calls of one layer within a batch, pooled (in the compiled function)."""
    if len(parts) == 1:
        return parts[0]
    count, mean, m2 = parts[0]
    for other_count, other_mean, other_m2 in parts[1:]:
        total = count + other_count
        ratio = keras.ops.cast(other_count, mean.dtype) / keras.ops.cast(total, mean.dtype)
        delta = other_mean - mean
        mean = mean + delta * ratio
        m2 = m2 + other_m2 + delta**2 * keras.ops.cast(count, mean.dtype) * ratio
        count = total
    return count, mean, m2


def _compiled(function, calls, jit_compile):
    """`function(inputs)` compiled as Keras compiles `predict` on this backend.

    The one place that differs by backend. TensorFlow: a `tf.function` that
    reads the variables as they are at each call. JAX: `jax.jit` of a
    stateless call, so the variables' current values are arguments, not
    constants baked in at the first trace. PyTorch: eager, without autograd.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _TensorFlowFunction(function, jit_compile)
    if backend == "jax":
        import jax

        variables = _variables(calls)

        def stateless(state, inputs):
            with keras.StatelessScope(state_mapping=list(zip(variables, state))):
                return function(inputs)

        jitted = jax.jit(stateless)
        return lambda inputs: jitted([_local(variable) for variable in variables], inputs)
    if backend == "torch":
        import torch

        def without_gradients(inputs):
            with torch.no_grad():
                return function(inputs)

        return without_gradients
    return function


def _local(variable):
    """A JAX variable's value on this process's devices.

    Under a `keras.distribution` spanning several processes a variable is a
    global array, part of it on devices this process cannot address; each
    process computes on its own data, with its own full copy of the
    variable (pooled afterwards, collective.py).
    """
    value = variable.value
    if getattr(value, "is_fully_addressable", True):
        return value
    if value.is_fully_replicated:
        return value.addressable_data(0)
    raise ValueError(
        f"Variable '{variable.path}' is sharded across processes ({value.sharding}), so no process holds "
        "all of it, and bnseq computes each process's statistics on that process alone. Recalibrate under "
        "a distribution that replicates the variables (keras.distribution.DataParallel). Received: a "
        f"variable of shape {tuple(value.shape)}"
    )


class _TensorFlowFunction:
    """A `tf.function` traced once for any batch size.

    Traced on the first call with the batch axis left open, so that a ragged
    last batch does not trace every step again (one trace of a ResNet50 step
    costs tens of milliseconds); inputs whose other axes change go to a
    second function that traces as it needs.
    """

    def __init__(self, function, jit_compile):
        self.function, self.jit_compile = function, jit_compile
        self.signature, self.traced, self.other = None, None, None

    def __call__(self, inputs):
        import tensorflow as tf

        if self.traced is None:
            self.signature = tf.nest.map_structure(
                lambda x: tf.TensorSpec((None, *x.shape[1:]) if len(x.shape) else (), x.dtype), inputs
            )
            self.traced = tf.function(
                self.function, input_signature=[self.signature], jit_compile=self.jit_compile, autograph=False
            )
        fits = all(
            spec.is_compatible_with(x)
            for spec, x in zip(tf.nest.flatten(self.signature), tf.nest.flatten(inputs))
        )
        if fits:
            return self.traced(inputs)
        if self.other is None:
            self.other = tf.function(
                self.function, jit_compile=self.jit_compile, reduce_retracing=True, autograph=False
            )
        return self.other(inputs)


def _variables(calls):
    seen, variables = set(), []
    for call in calls:
        for variable in getattr(call.operation, "variables", ()):
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
    return variables


class Capturing:
    """While active, the inputs of hidden BatchNormalization layers can be recorded.

    Each layer's `call` is wrapped for the duration (an instance attribute; a
    `call` the instance already had is put back on exit) to append its input
    to `seen` inside `recording(layers)`; within a compiled function that
    happens as it is traced. `order`, when set to a list, gets each layer
    the first time it runs.
    """

    def __init__(self, layers):
        self.layers = list({id(layer): layer for layer in layers}.values())
        self.seen = None
        self.order = None
        self._own = {}

    def __enter__(self):
        for layer in self.layers:
            if "call" in vars(layer):
                self._own[id(layer)] = vars(layer)["call"]
            layer.call = self._wrap(layer, layer.call)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.call
            if id(layer) in self._own:
                layer.call = self._own.pop(id(layer))
        return False

    def _wrap(self, layer, call):
        def recording_call(inputs, *args, **kwargs):
            if self.order is not None and not any(each is layer for each in self.order):
                self.order.append(layer)
            if self.seen is not None and id(layer) in self.seen:
                mask = kwargs.get("mask")
                self.seen[id(layer)].append((inputs, internals.keras_mask(inputs) if mask is None else mask))
            return call(inputs, *args, **kwargs)

        return recording_call

    @contextlib.contextmanager
    def recording(self, layers):
        """`seen`: `id(layer)` -> (input, mask or None) for each call of the layers in the block."""
        self.seen = {id(layer): [] for layer in layers}
        try:
            yield self.seen
        finally:
            self.seen = None
