"""`bnseq.fold`: fold BatchNormalization into the layer before it, for inference.

At inference a BatchNormalization is a fixed affine map per channel,
`y = s * (x - moving_mean) + beta` with `s = gamma / sqrt(moving_variance +
epsilon)`. After a linear layer `x = W * input + b` it folds into that layer:
`kernel' = kernel * s` (over output channels) and
`bias' = s * (b - moving_mean) + beta`, giving the same outputs with one layer
fewer. The fold math is the pure numpy functions at the top of this module;
the model rewrite is at the bottom.
"""

import dataclasses
import os

import keras
import numpy as np

from bnseq import kinds
from bnseq import probes
from bnseq.changing import rewrite
from bnseq.reading import files
from bnseq.reading import graph as graph_module

# Fold math ----------------------------------------------------------------


def batch_norm_affine(moving_mean, moving_variance, epsilon, gamma=None, beta=None):
    """The per-channel `(scale, shift)` of a BatchNormalization at inference.

    `y = scale * x + shift`, computed in float64.

    Args:
        moving_mean: array. The moving mean, one value per channel.
        moving_variance: array. The moving variance.
        epsilon: float. The layer's `epsilon`.
        gamma: array, optional. `None` when the layer has `scale=False`.
        beta: array, optional. `None` when the layer has `center=False`.

    Returns:
        (scale, shift), two float64 arrays.

    Examples:
        >>> scale, shift = batch_norm_affine(
        ...     np.array([1.0]), np.array([4.0]), 0.0, gamma=np.array([2.0]))
        >>> scale, shift
        (array([1.]), array([-1.]))
    """
    mean = np.asarray(moving_mean, np.float64)
    scale = 1.0 / np.sqrt(np.asarray(moving_variance, np.float64) + epsilon)
    if gamma is not None:
        scale = scale * np.asarray(gamma, np.float64)
    shift = -scale * mean
    if beta is not None:
        shift = shift + np.asarray(beta, np.float64)
    return scale, shift


def scale_kernel(kernel, scale, layout):
    """Scale a kernel's output channels by `scale`, in float64.

    Args:
        kernel: array. The kernel in Keras's layout.
        scale: array. One factor per output channel.
        layout: str. Where the output channels are: `"last"` for Dense
            `(in, out)`, convolutions `(*k, in/groups, out)` and the pointwise
            kernel of a separable convolution; `"transpose"` for transposed
            convolutions `(*k, out, in)`; `"depthwise"` for depthwise
            convolutions `(*k, in, multiplier)`, whose output channel
            `c * multiplier + m` is entry `[..., c, m]`.

    Returns:
        float64 array of the kernel's shape.
    """
    kernel = np.asarray(kernel, np.float64)
    if layout == "last":
        return kernel * scale
    if layout == "transpose":
        return kernel * scale[:, None]
    if layout == "depthwise":
        return kernel * scale.reshape(kernel.shape[-2:])
    raise ValueError(f"Unknown kernel layout. Received: layout={layout!r}")


def _layout(layer):
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)):
        return "transpose"
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return "depthwise"
    return "last"


def folded_weights(layer, batch_norm_layer):
    """The weights of `layer` with `batch_norm_layer` folded in.

    Args:
        layer: one of the linear layers, built, with the identity activation.
        batch_norm_layer: the built `BatchNormalization` right after it.

    Returns:
        list of arrays for `set_weights` on the same layer with
        `use_bias=True`: its kernels (only the last one, the pointwise kernel
        of a separable convolution, scaled) and the new bias, each in its
        variable's dtype.
    """
    return _weights_with(layer, None, batch_norm_layer)


def why_not_forward(layer):
    """Why an affine map per input channel cannot fold exactly into `layer`'s kernel, or None.

    `layer(s * x + t) = W' x + b'` with `W' = diag(s) W` (over input channels)
    and `b' = b + t W` (summed over the kernel's positions) holds wherever
    every output sums the same kernel positions: for Dense, and for
    convolutions that do not pad (`padding="valid"`, or every kernel size 1).
    Under zero padding a border output would see `s * 0 + t` where it sees 0.
    """
    foldable = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
    transposed = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
    if not isinstance(layer, foldable) or isinstance(layer, transposed):
        return f"{kinds.describe(layer)} is not a Dense layer or a plain or depthwise convolution"
    if type(layer) not in foldable:
        return f"{kinds.describe(layer)} is a subclass of {kinds.keras_base(layer).__name__}"
    if len(layer.weights) != 1 + int(layer.use_bias):
        return f"{kinds.describe(layer)} has weights beyond kernel and bias (quantized or LoRA)"
    if getattr(layer, "groups", 1) != 1:
        return f"{kinds.describe(layer)} is a grouped convolution"
    if not isinstance(layer, keras.layers.Dense) and layer.padding != "valid":
        if any(size != 1 for size in layer.kernel_size):
            return (
                f"{kinds.describe(layer)} pads its input ({layer.padding!r}) with a kernel larger than 1, "
                "where the shift would not reach the padded border"
            )
    return None


def forward_folded_weights(layer, scale, shift, kernel=None, bias=None):
    """`layer`'s kernel and bias with the map `x -> scale * x + shift` of its input folded in.

    Args:
        layer: a layer `why_not_forward` accepts, built.
        scale: array. One value per input channel.
        shift: array. One value per input channel.
        kernel: array, optional. The kernel to fold into (default: the
            layer's own).
        bias: array, optional. The bias to fold into (default: the layer's
            own; no bias is zeros).

    Returns:
        (kernel, bias) as float64 arrays.
    """
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel) if kernel is None else kernel, np.float64)
    if bias is None:
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else 0.0
    bias = np.asarray(bias, np.float64)
    scale, shift = np.asarray(scale, np.float64), np.asarray(shift, np.float64)
    # Input channels are the kernel's second-last axis in every layout accepted here.
    new_kernel = kernel * scale[:, None]
    spatial = tuple(range(kernel.ndim - 2))
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        # (*k, in, multiplier): output channel c * multiplier + m sees only input channel c.
        added = (shift[:, None] * kernel.sum(axis=spatial)).reshape(-1)
    else:
        added = np.tensordot(shift, kernel.sum(axis=spatial), axes=([0], [0]))
    return new_kernel, bias + added


# Decisions -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FoldDecision:
    """What `fold` does with one BatchNormalization.

    Attributes:
        batch_norm: str. The BatchNormalization's name.
        producer: str or None. The layer that feeds it, if exactly one does
            (the same word as `Finding.producer`); for one bnseq cannot see,
            the layer it is hidden in.
        folded: bool. Whether it folds into that layer.
        reason: str. Why it stays, when it does; empty when it folds.
        into: str or None. The layer after it that it folds into, when it
            folds forward (it follows an activation or another layer that is
            not linear, and feeds only a linear layer); `None` otherwise.
    """

    batch_norm: str
    producer: object
    folded: bool
    reason: str
    into: object = None

    def __str__(self):
        if self.folded and self.into is not None:
            return f"{self.batch_norm}: folded forward into {self.into}"
        if self.folded:
            return f"{self.batch_norm}: folded into {self.producer}"
        return f"{self.batch_norm}: kept, {self.reason}"


def fold_report(model, *, safe_mode=True):
    """What `fold(model)` would do with each BatchNormalization, in model order.

    Every BatchNormalization is accounted for, also one inside a subclassed
    layer or model whose `call()` bnseq cannot see (kept, with that reason).

    Args:
        model: `keras.Model` (Sequential or functional, subclasses built from
            inputs and outputs included), or the path of a `.keras` file.
        safe_mode: bool. Keras's `safe_mode` for loading a file.

    Returns:
        list of `FoldDecision`.

    Examples:
        >>> model = keras.Sequential([
        ...     keras.Input((4,)),
        ...     keras.layers.Dense(3, use_bias=False, name="d"),
        ...     keras.layers.BatchNormalization(name="bn"),
        ...     keras.layers.ReLU(name="relu"),
        ...     keras.layers.BatchNormalization(name="late"),
        ... ])
        >>> for decision in bnseq.fold_report(model):
        ...     print(decision)
        bn: folded into d
        late: kept, it follows ReLU 'relu', which is not a linear layer
    """
    model = files.as_model(model, safe_mode=safe_mode)
    return [decision for _, _, decision, _ in _decide(graph_module.walk(model))]


def _decide(graph):
    """(BatchNormalization, producer or None, FoldDecision, consumer or None) for each one.

    A BatchNormalization folds back into the linear layer that feeds it, or,
    where it cannot, forward into the linear layer that alone takes its output.
    """
    decisions = []
    for layer in graph.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            for hidden in graph.hidden_batch_norms(layer):
                reason = f"it is inside {kinds.describe(layer)}, and {graph.why_opaque(layer)}"
                decisions.append((hidden, None, FoldDecision(hidden.name, layer.name, False, reason), None))
            continue
        producer = graph.sole_producer(layer)
        reason = _why_not(graph, producer, layer)
        name = None if producer is None else producer.name
        if reason is None:
            decisions.append((layer, producer, FoldDecision(layer.name, name, True, ""), None))
            continue
        consumer, why_not_forward_reason = forward_target(graph, layer)
        if consumer is not None:
            decisions.append((layer, None, FoldDecision(layer.name, name, True, "", into=consumer.name), consumer))
            continue
        if why_not_forward_reason:
            reason += f"; nor forward: {why_not_forward_reason}"
        decisions.append((layer, None, FoldDecision(layer.name, name, False, reason), None))
    for layer in graph.uncalled:
        decisions.append((layer, None, FoldDecision(layer.name, None, False, "it is never called"), None))
    return decisions


def forward_target(graph, bn):
    """(the linear layer `bn` can fold forward into, None), or (None, why not or "")."""
    consumers = graph.consumers(bn)
    if len(consumers) != 1 or not graph.feeds_only(bn, consumers[0]):
        return None, ""
    (consumer,) = consumers
    if not kinds.is_linear(consumer):
        return None, ""
    if graph.producers(consumer) != [bn] or graph.calls_of(consumer) != 1:
        return None, f"{kinds.describe(consumer)} also takes other inputs"
    if graph.parents.get(id(consumer)) is not graph.parents.get(id(bn)):
        return None, f"{kinds.describe(consumer)} is in a different model"
    reason = why_not_forward(consumer)
    if reason is not None:
        return None, reason
    shape = graph.output_shape(bn)
    rank = len(shape) if shape is not None else kinds.output_rank(consumer)
    expected = -1 if isinstance(consumer, keras.layers.Dense) else kinds.channel_axis(consumer)
    if not kinds.same_axis(bn.axis, expected, rank):
        return None, f"its axis {bn.axis} is not the input channel axis of {kinds.describe(consumer)}"
    if not consumer.use_bias and _bias_lands_on_the_wrong_axis(consumer, graph.output_shape(consumer)):
        return None, f"{kinds.describe(consumer)} would need a bias this backend adds on the wrong axis"
    if not consumer.use_bias and _fuses_wrongly(graph, consumer, consumer):
        return None, _FUSION_REASON.format(layer=kinds.describe(consumer))
    return consumer, None


def _why_not(graph, producer, bn):
    """Why `bn` cannot fold into `producer`, or None when it can."""
    if producer is None:
        count = len(graph.producers(bn))
        return (
            "it takes a model input"
            if count == 0
            else f"it takes the outputs of {count} layers"
        )
    if not kinds.is_linear(producer):
        return f"it follows {kinds.describe(producer)}, which is not a linear layer"
    if not kinds.is_identity(producer.activation):
        return (
            f"{kinds.describe(producer)} applies its activation before it; "
            "only a linear layer with the identity activation folds"
        )
    if not graph.feeds_only(producer, bn):
        return f"the output of {kinds.describe(producer)} is also used elsewhere"
    if graph.parents.get(id(producer)) is not graph.parents.get(id(bn)):
        return f"it is in a different model than {kinds.describe(producer)}"
    if not kinds.same_axis(bn.axis, kinds.channel_axis(producer), kinds.output_rank(producer)):
        return (
            f"its axis {bn.axis} is not the channel axis of "
            f"{kinds.describe(producer)}"
        )
    if _bias_lands_on_the_wrong_axis(producer, graph.output_shape(producer)):
        return (
            f"{kinds.describe(producer)} is channels_first with as many channels "
            "as its last spatial size, where this Keras backend adds a bias "
            "along the last axis in eager calls; folding would change the "
            "outputs"
        )
    why = kinds.why_not_copied(producer)  # folding re-creates it from its config
    if why is not None:
        return f"{kinds.describe(producer)} cannot be re-created from its config: {why}"
    activation = _activation_after(graph, bn)
    if _fuses_wrongly(graph, producer, activation or bn):
        return _FUSION_REASON.format(layer=kinds.describe(producer))
    return None


_FUSION_REASON = (
    "folding would give {layer} a bias followed by an add and a LeakyReLU, which TensorFlow with oneDNN "
    "fuses into one kernel that ignores the slope under predict (probes.leaky_relu_fusion_is_sound); kept "
    "so that predict stays right"
)


def _fuses_wrongly(graph, layer, owner):
    """Whether a folded `layer`, with a bias, taking the place of `owner`'s output, would meet the bad fusion."""
    if isinstance(layer, keras.layers.Dense) or probes.leaky_relu_fusion_is_sound():
        return False
    return any(
        _is_add(consumer) and any(_is_leaky_relu(after) for after in graph.consumers(consumer))
        for consumer in graph.consumers(owner)
    )


def _is_add(operation):
    return isinstance(operation, keras.layers.Add) or type(operation).__name__ == "Add"  # the layer or keras.ops.add


def _is_leaky_relu(operation):
    if isinstance(operation, keras.layers.LeakyReLU) or type(operation).__name__ == "LeakyRelu":
        return True
    if isinstance(operation, keras.layers.ReLU):
        return bool(operation.negative_slope)
    return isinstance(operation, keras.layers.Activation) and operation.activation is keras.activations.leaky_relu


def _bias_lands_on_the_wrong_axis(layer, shape):
    """Whether `layer`'s bias would be added along the wrong axis.

    See `probes.bias_add_is_sound`: where the backend guesses the layout of a
    bias from the input's shape, a channels_first layer whose last spatial size
    equals its channel count gets its bias on the last axis in eager calls
    (`predict`'s compiled graph is right). The layer's own BatchNormalization
    is not affected, so folding would change outputs exactly then.
    """
    if kinds.channel_axis(layer) != 1:
        return False
    if shape is None:
        return True  # unknown: keep the BatchNormalization, to be safe
    return shape[-1] == shape[1] and not probes.bias_add_is_sound()


# The rewrite ----------------------------------------------------------------


def fold(model, *, strict=False, safe_mode=True):
    """Folds each BatchNormalization into the linear layer before it.

    Returns a new model of plain Keras layers (loadable where bnseq is not
    installed) that, in inference mode, computes what `model` computes with
    fewer layers: a `keras.Sequential` for a Sequential model, and a plain
    functional `keras.Model` with the same inputs and outputs for a
    functional one (also for a subclass built from inputs and outputs, such
    as a keras-hub backbone, whose own class is not kept). A BatchNormalization
    folds when the layer that feeds it is one of the linear layers bnseq
    knows, with the identity activation, whose output nothing else uses, and
    its axis is that layer's channel axis; the folded layer gets
    `use_bias=True`, and an `Activation` layer that alone follows the
    BatchNormalization becomes the layer's own `activation` again, so a folded
    unit is exactly what a model without BatchNormalization has. Models nested
    in the model are folded the same way.

    Every other layer, a BatchNormalization that cannot fold included, is not
    copied: the folded model holds the same layer objects as the original
    (their weights shared), so a `Lambda` or custom layer is never re-created.
    The original model and its weights are untouched.

    The folded model is for inference only: training it would not normalize.

    Args:
        model: `keras.Model`, Sequential (from Keras or bnseq) or functional,
            built; or the path of a `.keras` file.
        strict: bool. If `True`, raise instead of keeping a BatchNormalization
            that cannot fold.
        safe_mode: bool. Keras's `safe_mode` for loading a file: `False` for
            a trusted file with `Lambda` layers.

    Returns:
        The folded model.

    Raises:
        TypeError: if `model` is neither a model nor a path, or is a
            subclassed model (no graph to rebuild).
        ValueError: if `model` is not built, or, with `strict=True`, if a
            BatchNormalization cannot fold (the message lists each and why).

    Examples:
        >>> model = bnseq.Sequential(
        ...     [keras.Input((4,)), keras.layers.Dense(3, activation="relu")],
        ...     batch_norm=True)
        >>> folded = bnseq.fold(model)
        >>> [type(layer).__name__ for layer in folded.layers]
        ['Dense']
        >>> folded.layers[0].get_config()["activation"]
        'relu'
        >>> x = np.ones((2, 4), "float32")
        >>> expected = keras.ops.convert_to_numpy(model(x, training=False))
        >>> bool(np.allclose(keras.ops.convert_to_numpy(folded(x)), expected, atol=1e-6))
        True
    """
    return fold_with_report(model, strict=strict, safe_mode=safe_mode)[0]


def fold_with_report(model, *, strict=False, safe_mode=True):
    """`fold(model)` and `fold_report(model)` from one reading of the model.

    For callers that show what was folded (the command line, the demo): the
    model is walked once.

    Args:
        model: as for `fold`.
        strict: bool. As for `fold`.
        safe_mode: bool. As for `fold`.

    Returns:
        (the folded model, list of `FoldDecision`).

    Examples:
        >>> model = bnseq.Sequential(
        ...     [keras.Input((4,)), keras.layers.Dense(3)], batch_norm=True)
        >>> folded, report = bnseq.fold_with_report(model)
        >>> [str(decision) for decision in report]  # doctest: +ELLIPSIS
        ['dense..._bn: folded into dense...']
    """
    if not isinstance(model, keras.Model) and not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "fold expects a keras.Model or the path of a .keras file. "
            f"Received: model={model!r} (of type {type(model).__name__})"
        )
    model = files.as_model(model, safe_mode=safe_mode)
    if not model.built:
        raise ValueError(
            f"{type(model).__name__} '{model.name}' is not built, so it has no "
            "weights or statistics to fold. Build it (call it on data, or "
            "start it with keras.Input) and train it first."
        )
    graph = graph_module.walk(model)
    decisions = _decide(graph)
    report = [decision for _, _, decision, _ in decisions]
    left = [decision for decision in report if not decision.folded]
    if strict and left:
        raise ValueError(
            f"{len(left)} BatchNormalization layer(s) of model '{model.name}' "
            "cannot be folded:\n" + "\n".join(f"- {decision}" for decision in left)
        )
    plan = rewrite.Plan("fold", _plain_sequential)
    backward, forward, layers_by_id = {}, {}, {}
    for bn, producer, _, consumer in decisions:
        if producer is not None:
            activation = _activation_after(graph, bn)
            backward[id(producer)] = (bn, activation)
            layers_by_id[id(producer)] = producer
            plan.drop.add(id(bn))
            if activation is not None:
                plan.drop.add(id(activation))
        elif consumer is not None:
            forward[id(consumer)] = bn
            layers_by_id[id(consumer)] = consumer
            plan.drop.add(id(bn))
    for key, layer in layers_by_id.items():
        before = forward.get(key)
        after, activation = backward.get(key, (None, None))
        folded_layer = _folded_layer(layer, activation)
        plan.replace[key] = [folded_layer]
        plan.finish.append(
            lambda layer=layer, before=before, after=after, folded_layer=folded_layer: folded_layer.set_weights(
                _weights_with(layer, before, after)
            )
        )
    return rewrite.apply(model, plan, graph.flat), report


def _weights_with(layer, before, after):
    """`layer`'s weights with `before` folded forward into it and `after` folded back into it."""
    weights = layer.get_weights()
    kernels = [np.asarray(each, np.float64) for each in (weights[:-1] if layer.use_bias else weights)]
    bias = np.asarray(weights[-1], np.float64) if layer.use_bias else 0.0
    if before is not None:  # a single kernel (why_not_forward)
        kernel, bias = forward_folded_weights(layer, *affine_of(before), kernel=kernels[0], bias=bias)
        kernels = [kernel]
    if after is not None:
        scale, shift = affine_of(after)
        kernels = [*kernels[:-1], scale_kernel(kernels[-1], scale, _layout(layer))]
        bias = scale * bias + shift
    bias_dtype = weights[-1].dtype if layer.use_bias else weights[0].dtype
    return [
        *(kernel.astype(original.dtype) for kernel, original in zip(kernels, weights)),
        np.asarray(bias).astype(bias_dtype),
    ]


def affine_of(bn):
    """`batch_norm_affine` of a built BatchNormalization layer: its `(scale, shift)` at inference."""
    return batch_norm_affine(
        keras.ops.convert_to_numpy(bn.moving_mean),
        keras.ops.convert_to_numpy(bn.moving_variance),
        bn.epsilon,
        gamma=keras.ops.convert_to_numpy(bn.gamma) if bn.scale else None,
        beta=keras.ops.convert_to_numpy(bn.beta) if bn.center else None,
    )


def _plain_sequential(model, tensor, layers, unit_sizes):
    start = [] if tensor is None else [tensor]
    return keras.Sequential(start + list(layers), name=model.name, trainable=model.trainable)


def _folded_layer(producer, activation):
    """A new layer like `producer`, with a bias and, merged, `activation`'s function.

    The activation is carried as the function object, not through its
    config: a lambda (as keras-hub's MobileNetV5 uses for exact GELU) does not
    deserialize in safe mode.
    """
    config = producer.get_config()
    config["use_bias"] = True
    if activation is not None:
        config["activation"] = "linear"
        if activation.activity_regularizer is not None:
            config["activity_regularizer"] = activation.get_config()["activity_regularizer"]
    layer = producer.__class__.from_config(config)
    if activation is not None:
        layer.activation = activation.activation
    return layer


def _activation_after(graph, bn):
    """The `Activation` layer that alone takes `bn`'s output, to merge back.

    With it merged into the linear layer's own `activation`, a folded unit is
    exactly the layer a model without BatchNormalization would have.
    """
    consumers = graph.consumers(bn)
    if len(consumers) != 1 or not graph.feeds_only(bn, consumers[0]):
        return None
    (activation,) = consumers
    if not isinstance(activation, keras.layers.Activation):
        return None
    if graph.parents.get(id(activation)) is not graph.parents.get(id(bn)):
        return None
    return activation


def probe_difference(model, folded, batch_size=2, seed=0):
    """The largest output difference between two models on a random input.

    Both run in inference mode on the same standard-normal probe (unknown
    dimensions other than the batch are taken as 8), both as `predict` runs
    them (`probes.predicted`) and both eagerly, compiled by XLA where this
    machine needs it; the larger difference counts.

    Returns:
        (largest absolute difference, that divided by the largest absolute
        output of `model`).
    """
    probe = probes.random_inputs(model, batch_size, seed)
    probe = probe[0] if len(probe) == 1 else probe
    difference = scale = 0.0
    # Both as predict runs them (compiled: TensorFlow's graph optimizer has bugs of its own, see
    # probes.leaky_relu_fusion_is_sound), and both eagerly: like with like, since a backend bug
    # that both models meet alike (probes.bias_add_is_sound) is not the fold's doing.
    for run in (probes.predicted, probes.infer):
        expected, actual = keras.tree.flatten(run(model, probe)), keras.tree.flatten(run(folded, probe))
        for a, b in zip(expected, actual):
            a, b = np.asarray(a), np.asarray(b).reshape(np.shape(a))
            difference = max(difference, float(np.max(np.abs(a - b))))
            scale = max(scale, float(np.max(np.abs(a))))
    return difference, difference / scale if scale else difference
