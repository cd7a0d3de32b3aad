"""`bnseq.quantize_aware`: a new model that trains for int8, BatchNormalization folded.

The decisions live in `deciding/quantize_plan.py` (which layer becomes a unit,
what it takes in, which outputs get a range) and the layers in
`changing/quantized_layers.py`; here the plan becomes a model through the
rewrite engine. Unlike `fold`, whose result is for inference, this model
trains: so it shares no layer that holds variables with the source model.
Every such layer is a copy (from its config, with its weights), and the source
model is left exactly as it was whatever the new one learns. The new model
computes in float32 whatever the source's dtype policy: it simulates int8,
float16 rounding on top would be noise the export does not have, and Keras's
LiteRT export writes float16 layers as Flex ops.
"""

import dataclasses

import keras

from bnseq import kinds
from bnseq.changing import quantized_layers
from bnseq.changing import rewrite
from bnseq.deciding import quantize_plan
from bnseq.reading import files
from bnseq.reading import graph as graph_module

FLOAT32 = "float32"


@dataclasses.dataclass(frozen=True)
class QuantizeAwareReport:
    """What `quantize_aware` made of each layer, as `QuantizeDecision`s in model order (inputs first).

    Attributes:
        decisions: tuple of `QuantizeDecision`.
        float32: tuple of str. The layers that compute in float16 or
            bfloat16 in the source model (mixed precision) and in float32 in
            the quantize-aware one.
        half_precision: tuple of str. Layers without variables that compute
            in half precision and cannot be re-created from their config (one
            taking a Python function), so the quantize-aware model shares them as they are.
    """

    decisions: tuple
    float32: tuple = ()
    half_precision: tuple = ()

    @property
    def units(self):
        """The names of the linear layers that train for int8."""
        return [decision.layer for decision in self.decisions if decision.how == "unit"]

    @property
    def folded(self):
        """The names of the BatchNormalization layers folded into units."""
        return [decision.layer for decision in self.decisions if decision.how == "folded"]

    @property
    def float_layers(self):
        """The `QuantizeDecision`s of the layers LiteRT will compute in float."""
        return [decision for decision in self.decisions if not decision.int8]

    def __str__(self):
        lines = [
            f"{len(self.units)} linear layer(s) trained for int8, {len(self.folded)} BatchNormalization "
            f"folded in, {len(self.float_layers)} layer(s) left in float"
        ]
        if self.float32:
            lines.append(f"computes in float32; these computed in float16 or bfloat16: {', '.join(self.float32)}")
        if self.half_precision:
            lines.append(
                f"left in half precision (no config to re-create them from): {', '.join(self.half_precision)}"
            )
        lines += [f"- {decision}" for decision in self.decisions]
        return "\n".join(lines)


def quantize_aware(model, *, freeze_statistics_after=None, momentum=0.99, strict=False, safe_mode=True):
    """A new model that trains for int8 with BatchNormalization folded, for `compile` and `fit`.

    Every Dense, Conv1D, Conv2D, DepthwiseConv2D, SeparableConv2D and
    Conv2DTranspose becomes a `bnseq.QuantizedLinear`: with the
    BatchNormalization right after it folded into its kernel and bias, and
    the activation after that, trained as LiteRT will run them in int8
    (weights rounded per output channel, per tensor for Dense and
    Conv2DTranspose; the output rounded to a range). While its statistics
    move, training folds with the moving standard deviation and corrects the
    output to the batch's (Jacob et al. 2018, section 3.2); after
    `freeze_statistics_after` training steps it computes with the moving
    statistics, exactly as the exported model will. Every model input and
    every other operation LiteRT runs in int8 (merges, average pooling,
    activations, a BatchNormalization that cannot fold) gets an
    `ActivationQuantizer`, a range learned as a moving minimum and maximum;
    max pooling, reshapes and padding keep their input's range. What bnseq
    does not train for int8 (recurrent layers, attention, custom layers)
    stays float, is listed in the report (`strict=True` refuses instead),
    and gets a range on its output so that what follows is int8. The new
    model computes in float32 even where `model` uses mixed precision (the
    report names the layers that did not).

    The result is one functional `keras.Model` (nested models and traced
    subclassed layers inlined), with the report as its
    `quantize_aware_report` attribute. It is new: layers that hold variables
    are copies, so training it leaves `model` as it was. It saves and loads
    as `.keras` where bnseq is imported. Train it with a learning rate
    about that of the end of the float training; `bnseq.export(qat_model,
    "model.tflite")` then writes an int8 LiteRT model from its ranges, with
    no calibration data, and checks it.

    Args:
        model: `keras.Model`, built (trained in float, usually); or the
            path of a `.keras` file.
        freeze_statistics_after: int, optional. Training steps (batches)
            after which every folded BatchNormalization stops updating its
            statistics and computes with them; `None` (the default): never.
            Jacob et al. freeze late in training: for example after 80% of
            the steps you train for.
        momentum: float. For the moving ranges.
        strict: bool. If `True`, raise instead of leaving a layer in float.
        safe_mode: bool. Keras's `safe_mode` for loading a file.

    Returns:
        The quantize-aware `keras.Model`.

    Raises:
        TypeError: if `model` is neither a model nor a path, or is a
            subclassed model whose `call()` does not trace.
        ValueError: if `model` is not built, holds no layer to train for
            int8, holds a layer with variables that cannot be copied, or,
            with `strict=True`, a layer that would stay float (each is
            listed with the reason); for a bad `freeze_statistics_after`.

    Examples:
        >>> model = bnseq.Sequential(
        ...     [keras.Input((4,)), keras.layers.Dense(3, activation="relu", name="hidden"),
        ...      keras.layers.Dense(2, name="logits")],
        ...     batch_norm=True)
        >>> qat = bnseq.quantize_aware(model)
        >>> [type(layer).__name__ for layer in qat.layers]
        ['InputLayer', 'ActivationQuantizer', 'QuantizedLinear', 'QuantizedLinear']
        >>> print(qat.quantize_aware_report)
        2 linear layer(s) trained for int8, 2 BatchNormalization folded in, 0 layer(s) left in float
        - input: int8 Input, its output range learned
        - hidden: int8 Dense, hidden_bn folded in, then hidden_relu
        - hidden_bn: folded into hidden
        - hidden_relu: fused into hidden
        - logits: int8 Dense, logits_bn folded in
        - logits_bn: folded into logits
    """
    return quantize_aware_with_report(
        model, freeze_statistics_after=freeze_statistics_after, momentum=momentum, strict=strict,
        safe_mode=safe_mode,
    )[0]


def quantize_aware_with_report(model, *, freeze_statistics_after=None, momentum=0.99, strict=False,
                               safe_mode=True):
    """`quantize_aware(model)` and its `QuantizeAwareReport`.

    Returns:
        (the quantize-aware model, `QuantizeAwareReport`).
    """
    model = files.built_model(model, what="quantize_aware", holds="weights", strict=strict, safe_mode=safe_mode)
    _check_options(freeze_statistics_after, momentum)
    graph = graph_module.walk(model)
    plan = quantize_plan.decide(graph)
    report = QuantizeAwareReport(tuple(plan.decisions))
    if not plan.units:
        names = ", ".join(kind.__name__ for kind in quantize_plan.QUANTIZABLE)
        raise ValueError(
            f"Model '{model.name}' holds no layer quantize_aware trains for int8 ({names}), so there is "
            "nothing to train. Received: " + "; ".join(str(decision) for decision in plan.decisions[:5])
        )
    if strict and report.float_layers:
        raise ValueError(
            f"{len(report.float_layers)} layer(s) of model '{model.name}' would stay float in int8 LiteRT:\n"
            + "\n".join(f"- {decision}" for decision in report.float_layers)
        )
    taken = {operation.name for operation in graph.layers} | {ref.name for ref in graph.flat.inputs}
    rebuild = rewrite.Plan("quantize_aware", sequential=None, inputs={})
    for ref in plan.inputs:
        rebuild.inputs[ref] = [_quantizer(f"{ref.name}_quantizer", taken, momentum)]
    for unit in plan.units:
        layer = _unit(unit, freeze_statistics_after, momentum)
        rebuild.replace[id(unit.layer)] = [layer]
        rebuild.finish.append(lambda unit=unit, layer=layer: _carry_unit(unit, layer))
    rebuild.drop.update(plan.absorbed)
    handled = set(rebuild.replace) | rebuild.drop
    for operation in graph.layers:
        if id(operation) in handled:
            continue
        chain = [_copy(operation, rebuild)]
        if id(operation) in plan.ranged:
            chain.append(_quantizer(f"{operation.name}_quantizer", taken, momentum, plan.ranged[id(operation)]))
        if chain != [operation]:
            rebuild.replace[id(operation)] = chain
    half = [operation for operation in graph.layers if _in_half_precision(operation)]
    shared = {id(each) for each in half
              if id(each) not in rebuild.drop and rebuild.replace.get(id(each), [each])[0] is each}
    report = dataclasses.replace(
        report,
        float32=tuple(each.name for each in half if id(each) not in shared),
        half_precision=tuple(each.name for each in half if id(each) in shared),
    )
    result = rewrite.apply(model, rebuild, graph.flat)
    result.quantize_aware_report = report
    return result, report


def _check_options(freeze_statistics_after, momentum):
    quantized_layers.check_freeze_statistics_after(freeze_statistics_after)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be a number in [0, 1). Received: momentum={momentum!r}")


def _quantizer(name, taken, momentum, fixed=None):
    return quantized_layers.ActivationQuantizer(momentum, fixed, name=rewrite.unique_name(name, taken), dtype=FLOAT32)


def _in_half_precision(operation):
    policy = getattr(operation, "dtype_policy", None)
    return getattr(policy, "compute_dtype", None) in ("float16", "bfloat16")


def _float32_config(layer):
    """`layer.get_config()`, computing (and keeping its variables) in float32."""
    config = layer.get_config()
    config["dtype"] = FLOAT32
    return config


def _unit(unit, freeze_statistics_after, momentum):
    """The `QuantizedLinear` of a planned unit, its layers fresh copies (weights set by `_carry_unit`)."""
    source = unit.layer
    config = _float32_config(source)
    config["activation"] = "linear"
    layer = type(source).from_config(config)
    batch_norm = None
    if unit.batch_norm is not None:  # Keras's own layer with the same options (a bnseq subclass included)
        source_bn = unit.batch_norm
        batch_norm = keras.layers.BatchNormalization(
            axis=source_bn.axis, name=source_bn.name, dtype=FLOAT32,
            trainable=source_bn.trainable, **rewrite.batch_norm_options(source_bn),
        )
    activation = unit.activation
    if isinstance(activation, keras.Layer):
        activation = type(activation).from_config(_float32_config(activation))
    elif activation is not None:
        activation = keras.layers.Activation(activation, name=f"{source.name}_activation", dtype=FLOAT32)
    freeze = 0 if unit.statistics_frozen else freeze_statistics_after
    return quantized_layers.QuantizedLinear(
        layer, batch_norm, activation, freeze_statistics_after=freeze, momentum=momentum, name=source.name,
        dtype=FLOAT32,
    )


def _carry_unit(unit, layer):
    layer.layer.set_weights(unit.layer.get_weights())
    if unit.batch_norm is not None:
        layer.batch_norm.set_weights(unit.batch_norm.get_weights())


def _copy(operation, rebuild):
    """`operation` itself when it holds no variables and computes in float32 (shared, as the rewrite
    engine shares), else a copy (in float32 where it computed in float16 or bfloat16).

    A copy is made from the layer's config and given its weights once
    built; a layer with variables that cannot be re-created is refused,
    naming it, rather than shared with the source model (training would
    change the source). One without variables is shared instead, in its own
    precision (the report's `half_precision`).
    """
    if not isinstance(operation, keras.Layer) or not (operation.variables or _in_half_precision(operation)):
        return operation
    if not operation.variables:  # only its precision to change: shared where it cannot be re-created
        try:
            return type(operation).from_config(_float32_config(operation))
        except Exception:  # any class's own from_config; a Python lambda refuses in safe mode
            return operation
    try:
        copy = type(operation).from_config(
            _float32_config(operation) if _in_half_precision(operation) else operation.get_config()
        )
    except Exception as error:  # any class's own from_config
        raise ValueError(
            f"quantize_aware trains a new model and leaves yours as it was, so it copies each layer that "
            f"holds variables; {kinds.describe(operation)} cannot be re-created from its config ({error}). "
            "Give the class a get_config() that its __init__ takes back, and register it with "
            "keras.saving.register_keras_serializable."
        ) from error
    weights = operation.get_weights()
    rebuild.finish.append(lambda: copy.set_weights(weights))
    return copy
