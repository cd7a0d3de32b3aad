"""Which axis holds the channels: one propagation rule, read two ways.

A BatchNormalization normalizes one axis, the channels of what feeds it.
Which axis that is depends on the layers before it: a channels_first
convolution puts them on axis 1, a merge of such convolutions keeps them
there, a `Permute` moves them, a `Reshape` may lose them. `transfer` is the
one rule for a single operation (given the channel axes of its inputs, the
channel axis of its output, or `None` for unknown); two walkers apply it:

- `axis_of_tensor(tensor)` walks back from a Keras symbolic tensor through
  the layers that produced it, into nested models and traced subclassed
  layers: what
  `bnseq.BatchNormalization(axis="auto")` reads when it is first called.
- `axes_of_graph(flat)` runs forward over a flattened model (subclassed
  blocks traced, `trace.py`): what `lint`'s BN003 reads.

The rule, by kind of operation:

- a linear layer or one with a `data_format` (pooling, upsampling, padding,
  cropping): its format decides (`1` for channels_first, the last axis
  otherwise);
- any rank-2 output (Flatten, Dense features, global pooling): axis 1;
- a recurrent layer returning sequences (`LSTM`, `GRU`, `SimpleRNN`,
  `Bidirectional`): the last axis, its features; `TimeDistributed`: its
  inner layer's rule, one axis further out;
- `Permute` maps the axis; `Reshape` keeps it when the channel axis stays
  first or last with the same size; other reshaping operations (transposes,
  einsum, squeeze) give unknown;
- merges (layers or `keras.ops` calls: `add`, `multiply`, `concatenate`) and
  other Keras layers and operations whose output has the shape of their
  inputs pass the axis on when every input of that shape agrees;
- a layer that is not Keras's own (a `Lambda`, a custom layer that was not
  traced) gives unknown: its `call` may move axes;
- a model input: axis 1 at rank 2; at higher rank the last axis under
  `keras.config.image_data_format() == "channels_last"` (what every Keras
  layer assumes there); unknown under channels_first, where images and
  sequences cannot be told apart.

Unknown stays unknown: `axis="auto"` then raises, asking for `axis=`, and
lint says nothing. Axes are returned as non-negative indices.
"""

import keras
from keras import layers

from bnseq import internals
from bnseq import kinds
from bnseq.reading import graph as graph_module
from bnseq.reading import trace as trace_module

# Keras operations that move or merge axes: their output's layout is not their input's.
REARRANGING = {
    "Transpose", "Swapaxes", "Moveaxis", "Einsum", "Squeeze", "ExpandDims", "Tensordot", "Matmul",
    "Reshape", "Ravel", "Flatten", "Permute", "Repeat", "Tile", "Stack", "Unstack", "Split",
    "Dot", "Attention", "MultiHeadAttention", "GroupQueryAttention", "EinsumDense", "Embedding",
}


def source_axis(shape):
    """The channel axis of a tensor no layer produced (a model input), or `None`."""
    rank = len(shape)
    if rank <= 2:
        return rank - 1 if rank else None
    if keras.config.image_data_format() == "channels_last":
        return rank - 1
    return None


def transfer(operation, inputs, output_shape):
    """The channel axis of `operation`'s output.

    Args:
        operation: the layer or `keras.ops` operation.
        inputs: list of `(axis or None, shape or None)`, one per input tensor.
        output_shape: tuple or `None`. The output's shape.

    Returns:
        int (non-negative) or `None` when unknown.
    """
    if output_shape is None:
        return None
    rank = len(output_shape)
    if rank == 2:
        return 1
    if rank < 2:
        return None
    if kinds.is_linear(operation) or getattr(operation, "data_format", None) in ("channels_first", "channels_last"):
        return 1 if getattr(operation, "data_format", None) == "channels_first" else rank - 1
    name = type(operation).__name__
    if isinstance(operation, layers.TimeDistributed):  # the inner layer's rule, one axis further out
        inner = transfer(
            operation.layer,
            [(None if axis is None or axis < 2 else axis - 1, None if shape is None else (shape[0], *shape[2:]))
             for axis, shape in inputs],
            (output_shape[0], *output_shape[2:]),
        )
        return None if inner is None else inner + 1
    if isinstance(operation, (layers.RNN, layers.Bidirectional)) and getattr(operation, "data_format", None) is None:
        return rank - 1  # LSTM, GRU, SimpleRNN with return_sequences: (batch, time, features)
    if isinstance(operation, layers.Permute):
        return _permuted(operation.dims, inputs)
    if isinstance(operation, layers.Reshape) or name == "Reshape":
        return _reshaped(inputs, output_shape)
    if name in REARRANGING or isinstance(operation, layers.Lambda) or not kinds.is_keras_class(type(operation)):
        return None
    same = [axis for axis, shape in inputs if shape is not None and tuple(shape) == tuple(output_shape)]
    if isinstance(operation, layers.Concatenate) or name == "Concatenate":  # the layer or keras.ops.concatenate
        same = [axis for axis, shape in inputs if shape is not None and len(shape) == rank]
    if not same or any(axis is None for axis in same) or len(set(same)) != 1:
        return None
    return same[0]


def _permuted(dims, inputs):
    axis = inputs[0][0] if inputs else None
    if axis is None or axis == 0:
        return None
    return 1 + list(dims).index(axis) if axis in dims else None


def _reshaped(inputs, output_shape):
    if not inputs or inputs[0][0] is None or inputs[0][1] is None:
        return None
    axis, shape = inputs[0]
    if axis == len(shape) - 1 and shape[-1] is not None and output_shape[-1] == shape[-1]:
        return len(output_shape) - 1
    if axis == 1 and shape[1] is not None and len(output_shape) > 1 and output_shape[1] == shape[1]:
        return 1
    return None


# Walking back from a symbolic tensor ------------------------------------------------


def axis_of_tensor(tensor):
    """The channel axis of a Keras symbolic tensor, read from what produced it (`None`: unknown).

    The producer comes from `internals.history_of` (private Keras state: no
    public API names a tensor's producer).
    """
    return _Walker().axis(tensor)


class _Walker:
    def __init__(self):
        self.seen = {}

    def axis(self, tensor):
        key = id(tensor)
        if key not in self.seen:
            self.seen[key] = None  # a cycle (none in a valid graph) reads as unknown
            self.seen[key] = self._axis(tensor)
        return self.seen[key]

    def _axis(self, tensor):
        shape = tuple(tensor.shape)
        history = internals.history_of(tensor)
        if history is None:
            return source_axis(shape)
        operation, node, tensor_index = history
        if node is None:
            return None
        arguments = [each for each in keras.tree.flatten(node.input_tensors) if hasattr(each, "shape")]
        inputs = [(self.axis(each), tuple(each.shape)) for each in arguments]
        inside = _inside(operation, node)
        if inside is not None:  # a nested model or a traced layer: forward through its own graph
            return _through(inside, [axis for axis, _ in inputs], tensor_index)
        return transfer(operation, inputs, shape)


def _through(model, input_axes, index):
    flat = graph_module.flatten(model)
    if len(flat.inputs) != len(input_axes) or index >= len(flat.outputs):
        return None
    axes, _ = _propagate(flat, dict(zip(flat.inputs, input_axes)), _recorded_shape)
    return axes.get(flat.outputs[index])


def _inside(operation, node):
    """The functional graph of a nested model, or of a subclassed layer `trace.py` can trace; else `None`."""
    if isinstance(operation, keras.Model) and _has_graph(operation):
        return operation
    if trace_module.should_trace(operation):
        traced = trace_module.trace(operation, node.arguments.args, node.arguments.kwargs)
        return traced.model
    return None


def _has_graph(model):
    try:
        return model.outputs is not None and model.inputs is not None
    except (AttributeError, ValueError):
        return False


# Running forward over a flattened model ---------------------------------------------


def axes_of_graph(graph):
    """`id(layer)` -> the channel axis of its first call's first input, for each layer of a `graph.Graph`.

    Only where it is known: a layer whose input's axis is unknown is left out.
    """
    _, first_input = _propagate(graph.flat, {}, graph.output_shape)
    return first_input


def _propagate(flat, given, output_shape):
    """Run `transfer` forward over a flattened model: (`Ref` -> axis, `id(layer)` -> its first input's axis).

    `given` sets the axes of the model's inputs (the rest follow `source_axis`);
    `output_shape(layer)` gives a shape where a `Ref` carries none.
    """
    axes, shapes, first_input = {}, {}, {}
    for ref in flat.inputs:
        shapes[ref] = _shape(ref.spec)
        axes[ref] = given[ref] if ref in given else (None if shapes[ref] is None else source_axis(shapes[ref]))
    for call in flat.calls:
        inputs = [(axes.get(ref), shapes.get(ref)) for ref in call.inputs]
        if id(call.operation) not in first_input and inputs and inputs[0][0] is not None:
            first_input[id(call.operation)] = inputs[0][0]
        for index, ref in enumerate(call.outputs):
            shape = _shape(ref.spec)
            if shape is None and index == 0:
                shape = output_shape(call.operation)
            shapes[ref] = shape
            axes[ref] = transfer(call.operation, inputs, shape) if len(call.outputs) == 1 else None
    return axes, first_input


def _recorded_shape(operation):
    """The output shape Keras recorded for a layer's call (a layer of a Sequential model), or `None`."""
    try:
        return tuple(operation.output.shape)
    except (AttributeError, ValueError):
        return None


def _shape(spec):
    shape = getattr(spec, "shape", None)
    return None if shape is None else tuple(shape)
