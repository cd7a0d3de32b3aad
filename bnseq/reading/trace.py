"""Subclassed layers and models as functional graphs, by calling their `call()` on symbolic tensors.

A subclassed layer (a keras-hub block, a user's residual block) has no graph:
Keras records a call of it as one node. But Keras records every *layer call*
and every `keras.ops` call made on symbolic tensors, so calling the layer's
own `call()` method (not the layer, whose `__call__` would compute only an
output shape) on `keras.Input` tensors of the shapes it was called with
leaves a graph of its sublayers and ops behind: exactly a functional model.
PyTorch's FX tracer does the same for `nn.Module` code. `graph.flatten`
inlines each trace in place of the layer's call, recursively (a traced block
may call further subclassed blocks), so everything that reads models reads
the real dataflow in call order.

A trace is only used when it is sure to compute what the layer computes;
otherwise the layer stays one opaque leaf and `Trace.reason` says why, in one
line. The trace fails when the layer's `call()`:

- raises on symbolic tensors (Python control flow on tensor values, a
  backend function such as `tf.nn.relu` on a Keras tensor, `call()` creating
  variables);
- takes a different path under `fit` than under `predict`. Each trace runs
  in the mode Keras will call the layer in, never on its signature's
  default: `training=False` as `predict` resolves it, `training=True` as
  `fit` does (passed to `call()` and set in Keras's call context, which the
  layers inside inherit), and the two must be the same graph, constants
  included;
- calls a layer inside with a `training` of its own that differs from the
  mode (`self.bn(x, training=False)`): a graph runs every layer in its
  caller's mode;
- changes a variable as it runs (`self.steps.assign_add(1)`): a graph would
  not hold the update (the variable is put back);
- reads a weight or a tensor of its own directly instead of through a layer
  (it would be a constant of the graph, unsaved and untracked), or returns
  something not computed from its inputs (randomness drawn eagerly);
- receives a Keras mask (a mask travels beside the graph, not in it);
- computes, on a random input, something other than the layer itself, in
  inference or in training (the last check, against anything the others
  miss).

Tracing leaves the layers as they were: the nodes Keras appends to each
sublayer while tracing are removed again (see `internals.nodes_restored`),
and every variable a trace or a check moved (a counter, moving statistics
under `training=True`, a seed) is put back (`probes.unchanged`).

Traces are kept per layer (weakly) and per input shapes, so that reading a
model twice gives the same graph objects (and `recalibrate` compiles nothing
the second time). Like a compiled `predict`, a trace holds what the layer's
Python code read when it was traced.
"""

import dataclasses
import functools
import inspect
import weakref

import keras
import numpy as np

from bnseq import internals
from bnseq import kinds
from bnseq import notices
from bnseq import probes

# Relative difference between a trace and the layer on a random input above which
# the trace is not used: float32 reassociation in XLA or oneDNN stays far below it.
TOLERANCE = 1e-4


@dataclasses.dataclass(eq=False)
class Trace:
    """A layer's `call()` as a functional model, or why it could not be one.

    Attributes:
        layer: `keras.Layer`. The layer traced.
        model: `keras.Model` or `None`. A functional model of the layer's
            sublayers and ops, with one input per tensor of the call (in the
            order of `keras.tree.flatten((args, kwargs))`) and the call's
            output structure; `None` when the trace failed.
        reason: str. Why the layer could not be traced, in one line; empty
            when it was.
    """

    layer: object
    model: object
    reason: str

    @property
    def ok(self):
        return self.model is not None


_TRACES = weakref.WeakKeyDictionary()  # layer -> {key: Trace}


def should_trace(layer):
    """Whether `layer` is a subclassed layer or model worth looking into.

    That is a layer (not a Sequential or functional model, which have
    graphs, and not one of Keras's own layers) holding a BatchNormalization
    or a layer bnseq rewrites.
    """
    if not isinstance(layer, keras.Layer) or kinds.is_keras_class(type(layer)) or kinds.reads_as_leaf(layer):
        return False
    if isinstance(layer, keras.Sequential) or internals.is_functional(layer):
        return False
    return any(
        isinstance(each, keras.layers.BatchNormalization) or kinds.is_linear(each)
        for each in internals.inner_layers(layer)
    )


def trace(layer, args, kwargs):
    """Trace one call of `layer`.

    Args:
        layer: `keras.Layer`. A subclassed layer or model, built.
        args: tuple. The call's positional arguments, with a `KerasTensor`
            (of the shape and dtype the call had) for each tensor.
        kwargs: dict. The keyword arguments, likewise.

    Returns:
        `Trace`.

    Examples:
        >>> class Block(keras.Layer):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.dense = keras.layers.Dense(3, use_bias=False)
        ...         self.bn = keras.layers.BatchNormalization()
        ...     def call(self, x):
        ...         return keras.ops.relu(self.bn(self.dense(x)))
        >>> block = Block()
        >>> _ = block(np.ones((2, 4), "float32"))
        >>> result = trace(block, (keras.KerasTensor((None, 4)),), {})
        >>> [type(op).__name__ for op in result.model.operations]
        ['InputLayer', 'Dense', 'BatchNormalization', 'Relu']
    """
    key = _key(args, kwargs)
    traces = _TRACES.setdefault(layer, {})
    if key not in traces:
        traces[key] = _trace(layer, args, kwargs)
    return traces[key]


def _key(args, kwargs):
    def part(value):
        if isinstance(value, keras.KerasTensor):
            return ("tensor", tuple(value.shape), value.dtype)
        return repr(value)

    return repr(keras.tree.map_structure(part, (args, kwargs)))


def _trace(layer, args, kwargs):
    leaves = [leaf for leaf in keras.tree.flatten((args, kwargs)) if isinstance(leaf, keras.KerasTensor)]
    if any(internals.keras_mask(leaf) is not None for leaf in leaves):
        return Trace(layer, None, "its input carries a Keras mask, which travels beside a graph, not in it")
    if not layer.built:
        return Trace(layer, None, "it is not built")
    # A `training` given at the call is not what runs: a functional model passes its own caller's mode
    # to every layer in it (keras-team/keras#20285), so the layer is traced in both modes instead.
    kwargs = {key: value for key, value in kwargs.items() if key != "training"}
    takes_training = "training" in _parameters(layer)
    try:
        known = {id(each) for each in internals.inner_layers(layer)}
        model = _traced_model(layer, args, kwargs, training=False, takes_training=takes_training)
        other = _traced_model(layer, args, kwargs, training=True, takes_training=takes_training)
        if _signature(other, known) != _signature(model, known):
            return Trace(layer, None, "its call() takes a different path under fit (training=True) than under predict")
    except _Untraceable as error:
        return Trace(layer, None, str(error))
    for training in (False, True):
        reason = _differs(layer, args, kwargs, model, training)
        if reason:
            return Trace(layer, None, reason)
    return Trace(layer, model, "")


class _Untraceable(Exception):
    pass


def _parameters(layer):
    try:
        return inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return {}


def _traced_model(layer, args, kwargs, training, takes_training):
    """The functional model `layer.call` builds on fresh inputs like `args` and `kwargs`, in one mode."""
    inputs = []

    def fresh(value):
        if not isinstance(value, keras.KerasTensor):
            return value
        tensor = keras.Input(batch_shape=value.shape, dtype=value.dtype, sparse=value.sparse)
        inputs.append(tensor)
        # As Layer.__call__ does first: inputs cast to the layer's input dtype (a Cast in the graph).
        if getattr(layer, "_convert_input_args", True):
            return layer.dtype_policy.convert_input(tensor, layer.autocast, layer.input_dtype)
        return tensor

    call_args, call_kwargs = keras.tree.map_structure(fresh, (tuple(args), dict(kwargs)))
    if takes_training:
        call_kwargs["training"] = training
    weights_before = len(layer.weights)
    with internals.nodes_restored([layer, *internals.inner_layers(layer)]), probes.unchanged(layer) as changes:
        with internals.call_context(training):
            try:
                outputs = layer.call(*call_args, **call_kwargs)
            except Exception as error:  # anything call() raises on symbolic tensors
                raise _Untraceable(
                    f"its call() cannot run on symbolic tensors ({notices.first_line(error)})"
                ) from None
        if len(layer.weights) != weights_before:
            raise _Untraceable("its call() creates weights")
        for leaf in keras.tree.flatten(outputs):
            if not isinstance(leaf, keras.KerasTensor):
                raise _Untraceable(
                    f"its call() returns a {type(leaf).__name__} that is not computed from its inputs"
                )
        try:
            model = keras.Model(inputs, outputs, name=f"{layer.name}_traced")
        except Exception as error:  # a graph Keras cannot hold: disconnected, duplicate names
            raise _Untraceable(f"its graph is not a functional model ({notices.first_line(error)})") from None
    if changes.paths:
        raise _Untraceable(
            f"its call() changes the variable '{changes.paths[0]}' as it runs, an update a graph would not hold"
        )
    _check_constants(model)
    _check_modes(model, training)
    return model


def _check_modes(model, training):
    """Refuse a graph in which a layer was called with a `training` other than the mode traced."""
    for operation, (_, kwargs), _, _ in internals.calls_of(model):
        given = kwargs.get("training")
        if isinstance(given, bool) and given != training:
            raise _Untraceable(
                f"its call() runs {kinds.describe(operation)} with training={given} whatever the mode, "
                "where a graph would run it in its caller's mode"
            )


def _check_constants(model):
    """Refuse graphs holding a weight or a tensor as a constant argument of a call."""
    for operation, (args, kwargs), _, _ in internals.calls_of(model):
        for leaf in keras.tree.flatten((args, kwargs)):
            if isinstance(leaf, keras.KerasTensor) or leaf is None:
                continue
            if isinstance(leaf, keras.Variable):
                raise _Untraceable(
                    f"its call() reads the weight '{leaf.path}' directly in '{operation.name}', outside a layer"
                )
            if keras.ops.is_tensor(leaf) or (isinstance(leaf, np.ndarray) and leaf.size > 1):
                raise _Untraceable(f"its call() passes a tensor computed outside the graph to '{operation.name}'")


def _signature(model, known):
    """The operations of a traced model in order, how they are wired, and their constant arguments.

    `known`: ids of the layer's own sublayers, compared as objects; a layer
    made inside `call()` (new at each trace) is compared by its class. The
    `training` each call was given is left out: it is the mode traced.
    """
    position = {id(tensor): index for index, tensor in enumerate(model.inputs)}
    parts = []
    for operation, (args, kwargs), inputs, outputs in internals.calls_of(model):
        kind = id(operation) if id(operation) in known else type(operation).__name__
        constants = keras.tree.map_structure(
            lambda value: None if isinstance(value, keras.KerasTensor) else repr(value),
            (args, {key: value for key, value in kwargs.items() if key != "training"}),
        )
        parts.append((kind, tuple(position.get(id(tensor), -1) for tensor in inputs), repr(constants)))
        for tensor in outputs:
            position[id(tensor)] = len(position)
    return parts


def _differs(layer, args, kwargs, model, training):
    """Why the trace does not compute what `layer` computes on a random input, or `""`.

    Both run as `predict` (`training=False`) or a step of `fit`
    (`training=True`) runs them: inside a functional model called with
    `training` (the layer as one node of its own), compiled, each from the
    same variables, in one compiled function (the seeds the first run drew
    put back before the second; every variable put back afterwards: in
    training, BatchNormalization moves its statistics). A bare
    eager call would not do: Keras passes `training` down through its call
    context, and a layer created inside `call()` with a `training=True`
    default (keras-hub's SpatialPyramidPooling makes a `Resizing`) sets it for
    the layers after it when nothing above says otherwise.
    """
    rng = np.random.default_rng(0)

    def sample(value):
        shape = [2 if index == 0 and size is None else (4 if size is None else size) for index, size in
                 enumerate(value.shape)]
        dtype = keras.backend.standardize_dtype(value.dtype)
        if dtype == "bool":
            return np.ones(shape, bool)
        if "int" in dtype:
            return rng.integers(0, 3, shape).astype(dtype)
        return rng.standard_normal(shape).astype(dtype)

    leaves = [leaf for leaf in keras.tree.flatten((args, kwargs)) if isinstance(leaf, keras.KerasTensor)]
    values = [sample(leaf) for leaf in leaves]
    try:
        with internals.nodes_restored([layer, *internals.inner_layers(layer)]):
            inputs = [keras.Input(batch_shape=leaf.shape, dtype=leaf.dtype, sparse=leaf.sparse) for leaf in leaves]
            fresh = iter(inputs)
            call_args, call_kwargs = keras.tree.map_structure(
                lambda value: next(fresh) if isinstance(value, keras.KerasTensor) else value,
                (tuple(args), dict(kwargs)),
            )
            original = keras.Model(inputs, layer(*call_args, **call_kwargs))
        seeds = [(variable, np.array(keras.ops.convert_to_numpy(variable.value), copy=True))  # a copy: torch
                 for variable in probes.seeds_of(layer)]  # shares a tensor's memory with its NumPy view
        with probes.unchanged(layer):
            expected, actual = _run(layer, functools.partial(_both, original, model, values, training, seeds))
    except Exception as error:  # the random input does not suit the layer: the trace is unchecked
        return f"its trace could not be checked on a random input ({notices.first_line(error)})"
    expected, actual = keras.tree.flatten(expected), keras.tree.flatten(actual)
    if len(expected) != len(actual):
        return "its trace returns a different structure than its call()"
    for want, got in zip(expected, actual):
        if want.shape != got.shape:
            return "its trace returns a different shape than its call()"
        _, relative = probes.largest_difference([want], [got])  # NaN or infinity: infinitely different
        if not relative <= TOLERANCE:
            mode = "training" if training else "inference"
            return (
                f"its trace computes differently from its call() on a random input in {mode} (relative "
                f"difference {relative:.2g})"
            )
    return ""


def _both(original, traced, values, training, seeds):
    """The layer's outputs, then the trace's, in one function: one compile for both.

    The random seeds the first run drew from are put back before the second,
    so a `Dropout` draws the same mask in both: its `SeedGenerator`'s state,
    and on PyTorch the global generator, which Keras's torch backend draws
    from for a layer given no seed (put back afterwards too).
    """
    torch_state = _torch_random_state()
    expected = original(values, training=training)
    for variable, value in seeds:
        variable.assign(value)
    _torch_random_state(torch_state)
    actual = traced(values, training=training)
    _torch_random_state(torch_state)
    return expected, actual


def _torch_random_state(state=None):
    """PyTorch's global random state (set to `state` when given); `None` on other backends."""
    if keras.backend.backend() != "torch":
        return None
    import torch

    if state is not None:
        torch.random.set_rng_state(state)
    return torch.random.get_rng_state()


def _run(layer, function):
    """`function()` as NumPy, compiled as `predict` compiles (by XLA where channels_first needs it).

    `function` is a partial, not a lambda: TensorFlow counts the traces of
    one code object and warns of "excessive retracing" across layers.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        outputs = tf.function(function, jit_compile=probes.needs_xla(layer), autograph=False)()
    else:
        outputs = function()
    return keras.tree.map_structure(lambda x: np.asarray(keras.ops.convert_to_numpy(x)), outputs)
