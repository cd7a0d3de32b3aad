"""What `bnseq.quantize_aware` does with each layer: plain values in, plain values out.

An int8 LiteRT model computes every linear layer on int8 weights and every
tensor between layers on int8 levels of a range. So each leaf operation of a
model (as `graph.walk` reads it) becomes one of:

- a unit (`QuantizedLinear`): a linear layer LiteRT runs in int8, with the
  BatchNormalization right after it folded in and the activation after that
  fused, where each is used by the unit alone;
- ranged: an operation LiteRT has an int8 kernel for (merges, average
  pooling, activations, a BatchNormalization that cannot fold), its output
  rounded to a range learned in training (`ActivationQuantizer`);
- passed: an operation that moves or picks int8 values without computing new
  ones (max pooling, reshapes, padding, dropout), which keeps its input's range;
- float: an operation bnseq does not train for int8 (recurrent layers,
  attention, custom layers); it computes in float between a dequantize and
  a quantize, and its output gets a range so that what follows is int8.

`changing/quantizing.py` builds the model from these decisions.
"""

import dataclasses

import keras
from keras import layers as keras_layers

from bnseq import kinds
from bnseq.reading import holding

# The linear layers a QuantizedLinear holds (their exact classes: a subclass may compute otherwise).
QUANTIZABLE = (
    keras_layers.Dense,
    keras_layers.Conv1D,
    keras_layers.Conv2D,
    keras_layers.DepthwiseConv2D,
    keras_layers.SeparableConv2D,
    keras_layers.Conv2DTranspose,
)
# The ranges LiteRT's int8 kernels fix for these outputs (scale 1/256 from 0; scale 1/128 about 0).
FIXED_RANGES = {"softmax": (0.0, 255.0 / 256.0), "sigmoid": (0.0, 255.0 / 256.0), "tanh": (-1.0, 127.0 / 128.0)}
# Activations LiteRT fuses into the linear op before it rounds the output: no range of their own before.
FUSED_ACTIVATIONS = ("linear", "relu", "relu6")

# Operations that move or pick int8 values: LiteRT runs them on their input's scale.
PASSED = (
    keras_layers.MaxPooling1D, keras_layers.MaxPooling2D, keras_layers.MaxPooling3D,
    keras_layers.GlobalMaxPooling1D, keras_layers.GlobalMaxPooling2D, keras_layers.GlobalMaxPooling3D,
    keras_layers.Flatten, keras_layers.Reshape, keras_layers.Permute, keras_layers.RepeatVector,
    keras_layers.ZeroPadding1D, keras_layers.ZeroPadding2D, keras_layers.ZeroPadding3D,
    keras_layers.Cropping1D, keras_layers.Cropping2D, keras_layers.Cropping3D,
    keras_layers.Dropout, keras_layers.SpatialDropout1D, keras_layers.SpatialDropout2D,
    keras_layers.SpatialDropout3D, keras_layers.GaussianNoise, keras_layers.GaussianDropout,
    keras_layers.AlphaDropout, keras_layers.ActivityRegularization, keras_layers.Identity,
)
PASSED_OPERATIONS = frozenset({"Reshape", "Transpose", "ExpandDims", "Squeeze", "GetItem", "Slice", "Flatten"})
# Operations with an int8 kernel in LiteRT that compute new values: their output needs a range.
RANGED = (
    keras_layers.Add, keras_layers.Subtract, keras_layers.Multiply, keras_layers.Average,
    keras_layers.Maximum, keras_layers.Minimum, keras_layers.Concatenate,
    keras_layers.AveragePooling1D, keras_layers.AveragePooling2D, keras_layers.AveragePooling3D,
    keras_layers.GlobalAveragePooling1D, keras_layers.GlobalAveragePooling2D, keras_layers.GlobalAveragePooling3D,
    keras_layers.Activation, keras_layers.ReLU, keras_layers.LeakyReLU, keras_layers.ELU, keras_layers.PReLU,
    keras_layers.Softmax, keras_layers.BatchNormalization, keras_layers.UpSampling1D, keras_layers.UpSampling2D,
    keras_layers.Rescaling,
)
RANGED_OPERATIONS = frozenset({"Add", "Subtract", "Multiply", "Concatenate", "Mean", "Maximum", "Minimum"})
# Activation layers a unit takes in (no weights of their own).
FUSIBLE_ACTIVATIONS = (keras_layers.Activation, keras_layers.ReLU, keras_layers.LeakyReLU, keras_layers.ELU,
                       keras_layers.Softmax)


def activation_name(activation):
    """The name of an activation (a function, an `Activation` or `ReLU` layer), or `None` for any other.

    `ReLU(max_value=6)` is `"relu6"`; a leaky or thresholded `ReLU` has none.
    """
    if activation is None:
        return "linear"
    if isinstance(activation, keras_layers.Activation):
        activation = activation.activation
    if isinstance(activation, keras_layers.Softmax):
        return "softmax"
    if isinstance(activation, keras_layers.ReLU):
        if float(activation.negative_slope) == 0.0 and float(activation.threshold) == 0.0:
            if activation.max_value is None:
                return "relu"
            if float(activation.max_value) == 6.0:
                return "relu6"
        return None
    if isinstance(activation, keras.Layer):
        return None
    name = getattr(activation, "__name__", None)
    return name if name in (*FUSED_ACTIVATIONS, *FIXED_RANGES) else None


def fixed_range(operation):
    """The output range LiteRT fixes for `operation` (softmax, sigmoid, tanh), or `None`."""
    if isinstance(operation, (keras_layers.Activation, keras_layers.Softmax)):
        return FIXED_RANGES.get(activation_name(operation))
    if kinds.is_nonlinear_operation(operation):
        return FIXED_RANGES.get(type(operation).__name__.lower())
    return None


@dataclasses.dataclass(frozen=True)
class QuantizeDecision:
    """What `quantize_aware` does with one layer (or `keras.ops` call, or model input).

    Attributes:
        layer: str. Its name.
        kind: str. Its class (`"Input"` for a model input).
        how: str. `"unit"` (a linear layer trained for int8 as a
            `QuantizedLinear`), `"folded"` (a BatchNormalization folded into
            a unit), `"fused"` (an activation taken into a unit), `"ranged"`
            (int8, its output range learned), `"passed"` (int8, on its
            input's range) or `"float"`.
        into: str or None. For `"folded"` and `"fused"`: the unit.
        reason: str. For `"float"`: why; empty otherwise.
        batch_norm: str or None. For a unit: the BatchNormalization folded in.
        activation: str or None. For a unit: the activation it applies.
    """

    layer: str
    kind: str
    how: str
    into: object = None
    reason: str = ""
    batch_norm: object = None
    activation: object = None

    @property
    def int8(self):
        """Whether LiteRT computes it in int8 after `bnseq.export`."""
        return self.how != "float"

    def __str__(self):
        if self.how == "unit":
            parts = [f"{self.layer}: int8 {self.kind}"]
            if self.batch_norm:
                parts.append(f"{self.batch_norm} folded in")
            if self.activation:
                parts.append(f"then {self.activation}")
            return ", ".join(parts)
        if self.how in ("folded", "fused"):
            return f"{self.layer}: {self.how} into {self.into}"
        if self.how == "ranged":
            text = f"{self.layer}: int8 {self.kind}, its output range learned"
            return f"{text}; not folded: {self.reason}" if self.reason else text
        if self.how == "passed":
            return f"{self.layer}: int8 {self.kind}, on its input's range"
        return f"{self.layer}: float {self.kind}, {self.reason}"


@dataclasses.dataclass(frozen=True)
class Unit:
    """A linear layer and what it takes in: plain references to the model's own layers."""

    layer: object
    batch_norm: object = None
    activation: object = None  # a layer after it, or its own activation function
    statistics_frozen: bool = False


@dataclasses.dataclass
class Plan:
    """The decisions, and what the builder needs: units, absorbed layers, ranged operations."""

    decisions: list
    units: list
    absorbed: set  # id(layer) of the BatchNormalization and activation layers taken into units
    ranged: dict  # id(operation) -> its fixed range or None
    inputs: list  # graph.Ref of the model inputs that get a range


def why_not_unit(layer):
    """Why a linear layer cannot be trained for int8 as a unit, or `None`."""
    if type(layer) not in QUANTIZABLE:
        if isinstance(layer, QUANTIZABLE):
            return f"it is a subclass of {kinds.keras_base(layer).__name__}, whose call() may compute otherwise"
        names = ", ".join(kind.__name__ for kind in QUANTIZABLE)
        return f"bnseq trains {names} for int8, not {type(layer).__name__}"
    why = kinds.why_not_copied(layer)
    if why is not None:
        return why
    if getattr(layer, "groups", 1) != 1:
        return "it is a grouped convolution, which LiteRT's int8 CONV_2D does not take"
    return None


def _batch_norm_after(graph, layer):
    """The BatchNormalization right after `layer` that folds into its unit, or `(None, why not)`."""
    consumers = graph.consumers(layer)
    if len(consumers) != 1 or not isinstance(consumers[0], keras_layers.BatchNormalization):
        return None, ""
    (bn,) = consumers
    if not kinds.is_identity(layer.activation):
        return None, f"{kinds.describe(layer)} applies its activation before it"
    if not graph.feeds_only(layer, bn) or graph.calls_of(layer) != 1 or graph.calls_of(bn) != 1:
        return None, f"the output of {kinds.describe(layer)} is also used elsewhere"
    if graph.apart(layer, bn) or graph.parents.get(id(layer)) is not graph.parents.get(id(bn)):
        return None, f"it is in another model than {kinds.describe(layer)}"
    if not kinds.same_axis(bn.axis, kinds.channel_axis(layer), kinds.output_rank(layer)):
        return None, f"its axis {bn.axis} is not the channel axis of {kinds.describe(layer)}"
    if holding.affine_held(bn) and not holding.statistics_held(bn):
        return None, "its gamma and beta are frozen while its statistics train, which a unit cannot hold apart"
    return bn, ""


def _activation_after(graph, producer):
    """The activation layer that alone takes `producer`'s output, to take into the unit, or `None`."""
    consumers = graph.consumers(producer)
    if len(consumers) != 1 or not graph.feeds_only(producer, consumers[0]):
        return None
    (activation,) = consumers
    if type(activation) not in FUSIBLE_ACTIVATIONS or graph.calls_of(activation) != 1:
        return None
    if activation.dtype_policy.name != producer.dtype_policy.name:
        return None  # a float32 softmax after a bfloat16 layer, as mixed precision recommends: kept apart
    if graph.parents.get(id(activation)) is not graph.parents.get(id(producer)):
        return None
    return activation


def _kind(operation):
    return type(operation).__name__


def _float_output(graph, operation):
    """Whether `operation` returns one float tensor (something a range can round)."""
    for call in graph.flat.calls:
        if call.operation is operation:
            if len(call.outputs) != 1 or call.outputs[0].spec is None:
                return len(call.outputs) == 1
            return keras.backend.is_float_dtype(call.outputs[0].spec.dtype)
    return False


def decide(graph):
    """The `Plan` for a walked model."""
    decisions, units, absorbed, ranged, unfolded = [], [], {}, {}, {}
    inputs = [ref for ref in graph.flat.inputs if ref.spec is None or keras.backend.is_float_dtype(ref.spec.dtype)]
    decisions.extend(QuantizeDecision(ref.name, "Input", "ranged") for ref in inputs)
    for operation in graph.layers:
        name, kind = operation.name, _kind(operation)
        if id(operation) in absorbed:
            how, into = absorbed[id(operation)]
            decisions.append(QuantizeDecision(name, kind, how, into=into))
            continue
        if kinds.is_linear(operation) and why_not_unit(operation) is None:
            batch_norm, why_not = _batch_norm_after(graph, operation)
            if why_not:
                unfolded[id(graph.consumers(operation)[0])] = why_not
            activation = None
            if not kinds.is_identity(operation.activation):
                activation = operation.activation
            else:
                activation = _activation_after(graph, batch_norm or operation)
            for part, how in ((batch_norm, "folded"), (activation, "fused")):
                if isinstance(part, keras.Layer):
                    absorbed[id(part)] = (how, name)
            units.append(Unit(operation, batch_norm, activation,
                              batch_norm is not None and holding.statistics_held(batch_norm)))
            shown = activation.name if isinstance(activation, keras.Layer) else getattr(activation, "__name__", None)
            decisions.append(QuantizeDecision(
                name, kind, "unit", batch_norm=None if batch_norm is None else batch_norm.name, activation=shown,
            ))
            continue
        if isinstance(operation, PASSED) or (not isinstance(operation, keras.Layer) and kind in PASSED_OPERATIONS):
            decisions.append(QuantizeDecision(name, kind, "passed"))
            continue
        known = isinstance(operation, RANGED) or (
            not isinstance(operation, keras.Layer)
            and (kind in RANGED_OPERATIONS or kinds.is_nonlinear_operation(operation))
        )
        if _float_output(graph, operation):
            ranged[id(operation)] = fixed_range(operation)
        if known:
            reason = ""
            if isinstance(operation, keras_layers.BatchNormalization):
                reason = unfolded.get(id(operation)) or _why_not_folded(graph, operation)
            decisions.append(QuantizeDecision(name, kind, "ranged", reason=reason))
        else:
            decisions.append(QuantizeDecision(name, kind, "float", reason=_why_float(operation)))
    return Plan(decisions, units, set(absorbed), ranged, inputs)


def _why_float(operation):
    if kinds.is_linear(operation):
        return why_not_unit(operation)
    if isinstance(operation, (keras_layers.LSTM, keras_layers.GRU, keras_layers.SimpleRNN,
                              keras_layers.Bidirectional, keras_layers.RNN)):
        return "a recurrent layer, which bnseq does not train for int8"
    if isinstance(operation, keras_layers.MultiHeadAttention):
        return "attention, which bnseq does not train for int8"
    if isinstance(operation, keras.Layer) and not kinds.is_keras_class(type(operation)):
        return "a custom layer, whose call() bnseq does not quantize"
    return "bnseq knows no int8 kernel of LiteRT for it"


def _why_not_folded(graph, batch_norm):
    """Why a BatchNormalization that no unit takes in stays (LiteRT then runs it as int8 MUL and ADD)."""
    producer = graph.sole_producer(batch_norm)
    if producer is None:
        return "it takes a model input" if not graph.producers(batch_norm) else "it takes several inputs"
    if kinds.is_linear(producer):
        return f"{kinds.describe(producer)} stays float: {why_not_unit(producer)}"
    return f"it follows {kinds.describe(producer)}, which is not a linear layer"
