"""Every private Keras hook bnseq uses, in one place, each with the reason no public API serves.

bnseq is written against Keras 3's public API. Where it must read state Keras
keeps to itself (a functional model's node graph, the layers a subclassed layer
holds, the producer of a symbolic tensor, a tensor's mask) or undo what a
symbolic call leaves behind, it does so here and nowhere else, so that a Keras
release that moves one of these shows up in one module (and in the tests named
beside each function). Each was checked on Keras 3.14 and 3.15.

Not here: `bnseq.Sequential` works with `keras.Sequential`'s own inherited state
(`_layers`, `_functional`, `_maybe_rebuild`) in `changing/sequential.py` and
`changing/units.py`, as any subclass that changes `add`, `pop`, `build` or
`from_config` must (tests/test_keras_compat.py::test_keras_sequential_private_surface).

This module imports nothing of bnseq.
"""

import contextlib

import keras
from keras.src.backend.common import masking as _keras_masking


def is_functional(model):
    """Whether Keras holds a graph of layer calls for `model`.

    True for models built from inputs and outputs, subclasses built that way
    included; False for Sequential models (read by their layer list) and for
    subclassed models whose `call()` has no graph.
    """
    if isinstance(model, keras.Sequential):
        return False
    try:
        return model.outputs is not None and model._nodes_by_depth is not None
    except AttributeError:
        return False


def inner_layers(layer):
    """Every layer inside `layer` (not itself), for one whose insides no walk can see.

    `Layer._flatten_layers` is private Keras API; no public one lists the
    layers a subclassed layer or model holds (checked on Keras 3.14 and 3.15).
    """
    return list(layer._flatten_layers(include_self=False))


def child_layers(layer):
    """The layers `layer` holds directly (not theirs), in the order it made them (`_flatten_layers`, as above)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def calls_of(model):
    """The layer calls of a functional model, producers before consumers.

    Yields `(operation, arguments, input tensors, output tensors)` for each
    call, in Keras's own order (by depth, then by `model.operations`), where
    `arguments` is `(args, kwargs)` as the call was made. This reads Keras's
    private graph state (`_nodes_by_depth`, a node's `operation`, `is_input`,
    `arguments`, `input_tensors`, `outputs`), the same state
    `keras.models.clone_model` replays; it is isolated here and was checked on
    Keras 3.14 and 3.15 (tests/test_graph.py fails loudly if it changes).
    """
    order = {id(operation): index for index, operation in enumerate(model.operations)}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        nodes = sorted(model._nodes_by_depth[depth], key=lambda node: order.get(id(node.operation), -1))
        for node in nodes:
            if node.is_input or node.operation is None:
                continue
            arguments = (node.arguments.args, node.arguments.kwargs)
            yield node.operation, arguments, list(node.input_tensors), keras.tree.flatten(node.outputs)


def history_of(tensor):
    """`(operation, node, tensor_index)` of the call that produced a symbolic tensor, or `None`.

    `None` for a tensor with no producer (not symbolic, or a model input);
    `node` is `None` when the operation no longer holds the node (a layer whose
    nodes were truncated). Reads `KerasTensor._keras_history` and
    `Operation._inbound_nodes`: no public API names a tensor's producer.
    Test: tests/test_layers.py (axis="auto" reads the layer before it).
    """
    history = getattr(tensor, "_keras_history", None)
    if history is None or isinstance(history.operation, keras.layers.InputLayer):
        return None
    operation = history.operation
    nodes = getattr(operation, "_inbound_nodes", None) or []
    node = nodes[history.node_index] if history.node_index < len(nodes) else None
    return operation, node, history.tensor_index


@contextlib.contextmanager
def nodes_restored(layers):
    """Put every layer's inbound and outbound nodes back as they were on exit.

    Each symbolic call appends a `Node` to the called layer's `_inbound_nodes`
    and to its producers' `_outbound_nodes`. Left there, a sublayer of the
    user's model would have one node more per trace, and `layer.output` would
    then refuse ("multiple inbound nodes"). Test:
    `tests/test_trace.py::test_tracing_leaves_the_layers_as_they_were`.
    """
    kept = [(each, len(each._inbound_nodes), len(each._outbound_nodes)) for each in layers]
    try:
        yield
    finally:
        for each, inbound, outbound in kept:
            del each._inbound_nodes[inbound:]
            del each._outbound_nodes[outbound:]


@contextlib.contextmanager
def call_context(training):
    """Run code as inside a layer that Keras called with `training`: `False` as `predict`, `True` as `fit`.

    Keras passes `training` down to every layer called inside another through a
    call context kept in its global state (`"current_call_ctx"`, a
    `keras.src.layers.layer.CallContext`); a layer called with no `training`
    of its own takes the context's. No public API sets it without calling a
    layer, and tracing calls `layer.call()`, not the layer. The context is
    entered with no entry layer, so no inner layer's call clears it. Test:
    tests/test_never_wrong.py::test_traced_in_the_mode_keras_runs_not_the_signature_default.
    """
    from keras.src.backend.common import global_state
    from keras.src.layers.layer import CallContext

    previous = global_state.get_global_attribute("current_call_ctx")
    context = CallContext(entry_layer=None)
    context.set_value("training", training)
    global_state.set_global_attribute("current_call_ctx", context)
    try:
        yield
    finally:
        global_state.set_global_attribute("current_call_ctx", previous)


def keras_mask(tensor):
    """The Keras mask `tensor` carries, or `None`.

    Keras 3 carries a mask as an attribute of the tensor (`_keras_mask`, set by
    `Embedding(mask_zero=True)`, `Masking` and every layer that passes a mask
    on), read through `keras.src.backend.common.masking`, which has no public
    name. A change there breaks recalibrate's masked moments, and
    tests/test_recalibrate.py's masked tests show it.
    """
    return _keras_masking.get_keras_mask(tensor)


def carries_mask(spec):
    """Whether a symbolic tensor (a `KerasTensor`, or `None` when unknown) carries a mask."""
    return spec is not None and keras_mask(spec) is not None


def set_tracked(layer, name, value):
    """Set `layer.<name>` to `value`, untracking the Layer it held before.

    A Layer assigned as an attribute is tracked by Keras as a sublayer and, on
    the PyTorch backend, registered as a child `torch.nn.Module`; torch then
    refuses to assign a plain function over it. So the old Layer is deleted and
    untracked first (`Layer._tracker`, no public equivalent): without that, it
    would stay a sublayer of `layer` after moving out of it. Test:
    tests/test_sequential.py (activations given as layers, on every backend).
    """
    old = getattr(layer, name)
    if isinstance(old, keras.Layer):
        delattr(layer, name)
        layer._tracker.untrack(old)
    if isinstance(value, keras.Layer):
        locked = layer._tracker.locked
        layer._tracker.unlock()
        try:
            setattr(layer, name, value)
        finally:
            if locked:
                layer._tracker.lock()
    else:
        setattr(layer, name, value)


def optimizer_built_with(optimizer):
    """The model variables a built optimizer updates (`_trainable_variables`), or `None` if it is not built.

    A JAX train step hands the optimizer exactly these, and every optimizer
    refuses a variable it was not built with; no public API lists them. Test:
    tests/test_freeze.py (freeze and unfreeze after fit, on every backend).
    """
    if optimizer is None or not getattr(optimizer, "built", False):
        return None
    inner = getattr(optimizer, "inner_optimizer", None)  # a LossScaleOptimizer: the one that holds the variables
    return list((inner or optimizer)._trainable_variables)


def compiled_trainable_state(model):
    """`id(layer)` -> the `trainable` each layer had when `model` was compiled, or `None` where Keras keeps none.

    Keras 3.15 keeps it (`_compiled_trainable_state`) to warn in `fit` that a
    change needs a new `compile`; Keras 3.14 keeps nothing. Test:
    tests/test_freeze.py (BN006).
    """
    kept = getattr(model, "_compiled_trainable_state", None)
    if kept is None:
        return None
    return {id(layer): trainable for layer, trainable in kept.items()}


def note_trainable_state_compiled(model):
    """Tell Keras the model's train step is ready for its layers' current `trainable` (see above).

    After `bnseq.freeze` has reset the train step, Keras's warning to compile
    again would be wrong.
    """
    if getattr(model, "_compiled_trainable_state", None) is not None:
        model._compiled_trainable_state = {layer: layer.trainable for layer in model._flatten_layers()}
