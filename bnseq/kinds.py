"""The vocabulary every part of bnseq shares: what kind of layer this is.

Which layers are linear (bnseq normalizes them), which are activations, whether
a layer is one of Keras's own classes, the channel axis of a linear layer's
output, and how messages name a layer. Plain questions about a layer, asked in
reading, deciding and changing alike; this module imports nothing of bnseq.
"""

import keras
from keras import layers

# The linear layers bnseq rewrites, and their subclasses. Each computes
# `activation(linear(x) + bias)` with a single channel axis given by its
# `data_format`, so the bias can go and a BatchNormalization on that axis can
# sit between the linear part and the activation.
#
# Left alone on purpose:
# - `EinsumDense`: its equation decides which output axes carry the bias, and
#   there may be several, so there is no one channel axis to normalize.
# - Recurrent layers (`LSTM`, `GRU`, `SimpleRNN`): their activations are applied
#   inside the time loop, so a normalization that belongs before them would
#   have to go inside the recurrence (recurrent batch normalization, Cooijmans
#   et al. 2016), which no layer inserted after them can do.
LINEAR_LAYERS = (
    layers.Dense,
    layers.Conv1D,
    layers.Conv2D,
    layers.Conv3D,
    layers.Conv1DTranspose,
    layers.Conv2DTranspose,
    layers.Conv3DTranspose,
    layers.DepthwiseConv1D,
    layers.DepthwiseConv2D,
    layers.SeparableConv1D,
    layers.SeparableConv2D,
)

# Layers whose whole job is a nonlinearity.
ACTIVATION_LAYERS = (
    layers.Activation,
    layers.ReLU,
    layers.LeakyReLU,
    layers.PReLU,
    layers.ELU,
    layers.Softmax,
)

# Nonlinearities written as operations rather than layers, by the class of the operation Keras
# records in a functional graph: `keras.ops.silu(x)`, `keras.activations.gelu(x)` (which calls
# the op) and `keras.activations.relu(x)` (an operation of keras.activations) are read as the
# equivalent Activation layer is. keras-hub writes its activations this way.
NONLINEAR_OPERATIONS = frozenset({
    "ReLU", "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Glu", "Silu", "Swish",
    "HardSilu", "HardSwish", "Sigmoid", "HardSigmoid", "LogSigmoid", "Softplus", "Softsign",
    "SparsePlus", "Squareplus", "Tanh", "HardTanh", "TanhShrink", "SoftShrink", "HardShrink",
    "Softmax", "LogSoftmax", "Sparsemax", "Threshold", "Mish",
})


def is_nonlinear_operation(operation):
    """Whether `operation` is one of Keras's own elementwise nonlinearities, written as an op (not a layer)."""
    return (
        not isinstance(operation, keras.Layer)
        and is_keras_class(type(operation))
        and type(operation).__name__ in NONLINEAR_OPERATIONS
    )


def is_linear(layer):
    """Whether bnseq can normalize `layer` (one of `LINEAR_LAYERS`)."""
    return isinstance(layer, LINEAR_LAYERS)


def is_identity(activation):
    """Whether an activation function is the identity.

    Only functions count: an activation given as a Layer is the user's own
    object and is always kept as a layer of its own.
    """
    return activation is None or activation is keras.activations.linear


def is_nonlinearity(layer):
    """Whether `layer` ends in a nonlinear activation.

    True for an activation layer (`Activation` other than "linear", `ReLU`,
    `LeakyReLU`, `PReLU`, `ELU`, `Softmax`), for a linear layer whose own
    activation is not the identity, and for an activation written as an
    operation (`keras.ops.relu(x)`, `keras.activations.silu(x)`:
    `NONLINEAR_OPERATIONS`).
    """
    if is_nonlinear_operation(layer):
        return True
    if isinstance(layer, layers.Activation):
        return not is_identity(layer.activation)
    if isinstance(layer, ACTIVATION_LAYERS):
        return True
    if is_linear(layer):
        return not is_identity(layer.activation)
    return False


def output_rank(layer):
    """The rank of `layer`'s output, or `None` when it is not known yet.

    Convolutions know it from their class (`rank` spatial axes plus batch and
    channels); other layers only once they have been called.
    """
    rank = getattr(layer, "rank", None)
    if isinstance(layer, LINEAR_LAYERS[1:]) and isinstance(rank, int):
        return rank + 2
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def channel_axis(layer):
    """The axis that holds the channels of a linear layer's output.

    Returns:
        int: `1` for a `channels_first` convolution, `-1` otherwise.
    """
    if getattr(layer, "data_format", None) == "channels_first":
        return 1
    return -1


def same_axis(axis, expected, rank):
    """Whether `axis` names the same axis as `expected` in a tensor of `rank`.

    With an unknown rank, a negative and a positive axis cannot be compared:
    they are then taken to agree, so that no false alarm is raised.
    """
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return False
        (axis,) = axis
    if rank is None:
        if (axis < 0) == (expected < 0):
            return axis == expected
        return True
    return axis % rank == expected % rank


def position(index):
    """`layer 3` for a position in a model, or the text given (a place in a list)."""
    return index if isinstance(index, str) else f"layer {index}"


def describe(layer, index=None):
    """`Dense 'dense_1' (layer 3)`: how messages name a layer."""
    where = "" if index is None else f" ({position(index)})"
    return f"{type(layer).__name__} '{layer.name}'{where}"


def reads_as_leaf(layer):
    """Whether `layer` is one of bnseq's own layers that hold others but are read whole (never traced).

    A `QuantizedLinear` holds a linear layer and a BatchNormalization that it
    computes with itself; reading them as a graph would describe a model that
    is not there.
    """
    return bool(getattr(type(layer), "bnseq_reads_as_leaf", False))


def is_keras_class(kind):
    """Whether the class `kind` is one of Keras's own (defined in a `keras.` module)."""
    return kind.__module__.startswith("keras.")


def keras_base(layer):
    """The nearest class in `layer`'s ancestry that is Keras's own (its own class if it is)."""
    return next(kind for kind in type(layer).__mro__ if is_keras_class(kind))


def why_not_copied(layer):
    """Why a linear layer cannot be re-created from its config without risk, or `None`.

    Only Keras's own classes, with no weights beyond kernels and bias, come
    back whole from `get_config()`: a subclass may take `__init__` arguments
    its config leaves out, and a quantized or LoRA layer holds state a fresh
    layer would not have.
    """
    if type(layer) not in LINEAR_LAYERS:
        base = next(kind for kind in LINEAR_LAYERS if isinstance(layer, kind))
        return (
            f"it is a subclass of {base.__name__}, which bnseq does not re-create from its config "
            "(a config may leave out what the subclass's __init__ takes)"
        )
    if getattr(layer, "quantization_mode", None) is not None:
        return f"it is quantized ({layer.quantization_mode})"
    if getattr(layer, "lora_enabled", False):
        return "it has LoRA weights"
    kernels = 2 if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)) else 1
    if layer.built and len(layer.weights) != kernels + int(layer.use_bias):
        return "it has weights beyond its kernel and bias"
    return None
