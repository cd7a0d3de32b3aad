"""`bnseq.fold`: a folded model, built by the rewrite engine from the fold plan.

The math lives in `deciding/fold_math.py` and the decisions (which
BatchNormalization folds where, or why it stays) in `deciding/fold_plan.py`;
here the plan becomes a model: each folded linear layer built with its new
weights, the BatchNormalization (and an Activation merged back) dropped, and
`rewrite.apply` carrying every other layer over as the same object.
"""


import keras
import numpy as np

from bnseq import probes
from bnseq.changing import rewrite
from bnseq.deciding import fold_math
from bnseq.deciding import fold_plan
from bnseq.deciding import fold_through
from bnseq.reading import files
from bnseq.reading import graph as graph_module


def fold(model, *, strict=False, safe_mode=True):
    """Folds each BatchNormalization into the linear layer before it.

    Returns a new model of plain Keras layers (loadable where bnseq is not
    installed) that, in inference mode, computes what `model` computes with
    fewer layers: a `keras.Sequential` for a Sequential model, and a plain
    functional `keras.Model` with the same inputs and outputs for a
    functional one (also for a subclass built from inputs and outputs, such
    as a keras-hub backbone, whose own class is not kept). Where the model
    holds a subclassed layer that traces, or is a subclassed model that
    traces, its `call()` is inlined and the result is one functional
    `keras.Model` (a Sequential model included). A BatchNormalization
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
            subclassed model whose `call()` does not trace (the message
            says why).
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
    model = files.built_model(model, what="fold", holds="weights or statistics", strict=strict, safe_mode=safe_mode)
    graph = graph_module.walk(model)
    decisions = fold_plan.decide(graph)
    report = [decision for _, _, decision, _ in decisions]
    left = [decision for decision in report if not decision.folded]
    if strict and left:
        raise ValueError(
            f"{len(left)} BatchNormalization layer(s) of model '{model.name}' "
            "cannot be folded:\n" + "\n".join(f"- {decision}" for decision in left)
        )
    plan = rewrite.Plan("fold", _plain_sequential)
    backward, forward, layers_by_id = {}, {}, {}
    for bn, producer, decision, consumer in decisions:
        if decision.split is not None:
            # Across an Add or Concatenate: each linear layer takes its part of the map, the merge stays.
            merge = graph.sole_producer(bn)
            for linear, part in zip(producer, fold_through.split_parts(graph, merge, bn, producer)):
                backward[id(linear)] = ([part], None)
                layers_by_id[id(linear)] = linear
            plan.drop.add(id(bn))
        elif producer is not None:
            # Through a pooling layer, an activation after the BatchNormalization stays after the pooling.
            activation = None if decision.through is not None else fold_plan.activation_after(graph, bn)
            # A BatchNormalization right after another folds into the same layer, after it.
            earlier = backward[id(producer)][0] if decision.composed is not None else []
            backward[id(producer)] = ([*earlier, bn], activation)
            layers_by_id[id(producer)] = producer
            plan.drop.add(id(bn))
            if activation is not None:
                plan.drop.add(id(activation))
        elif consumer is not None:
            # Across a Flatten or Reshape: which channel each of the Dense layer's input features is.
            flattening = graph.sole_producer(consumer)
            forward[id(consumer)] = (bn, None if flattening is bn else _channels_after(bn, flattening, graph))
            layers_by_id[id(consumer)] = consumer
            plan.drop.add(id(bn))
    for key, layer in layers_by_id.items():
        before, channels = forward.get(key, (None, None))
        after, activation = backward.get(key, (None, None))
        folded_layer = _folded_layer(layer, activation)
        plan.replace[key] = [folded_layer]
        plan.finish.append(
            lambda layer=layer, before=before, after=after, channels=channels, folded_layer=folded_layer: (
                folded_layer.set_weights(fold_math.weights_with(layer, before, after, before_channels=channels))
            )
        )
    return rewrite.apply(model, plan, graph.flat), report
def _channels_after(bn, flattening, graph):
    """The channel of `bn`'s output that each feature of `flattening`'s output holds, as an int array.

    Read by flattening a tensor of channel indices with the layer itself (a
    Flatten or Reshape has no state; its data_format decides the order).
    """
    shape = graph.output_shape(bn)
    axis = bn.axis % len(shape)
    index = np.arange(shape[axis], dtype="float32").reshape([-1 if each == axis else 1 for each in range(len(shape))])
    channels = np.broadcast_to(index, (1, *shape[1:])).copy()
    flat = keras.ops.convert_to_numpy(flattening(keras.ops.convert_to_tensor(channels)))
    return np.rint(flat[0]).astype(int)


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
    # Both as predict runs them (compiled: TensorFlow's graph optimizer has bugs of its own, see
    # probes.leaky_relu_fusion_is_sound), and both eagerly: like with like, since a backend bug
    # that both models meet alike (probes.bias_add_is_sound) is not the fold's doing. A NaN or an
    # infinity on either side is an infinite difference.
    expected, actual = [], []
    for run in (probes.predicted, probes.infer):
        expected += keras.tree.flatten(run(model, probe))
        actual += keras.tree.flatten(run(folded, probe))
    return probes.largest_difference(expected, actual)
