"""Folds that move a BatchNormalization back across a layer that commutes with it, into the linear layers there.

A per-channel affine map `scale * x + shift` after a pooling layer equals the
same map before it (`through_pooling`), and after a sum or a concatenation of
linear layers it splits into one map per input (`through_merge`). Either way
it lands right after linear layers and folds into them as it would there.
`fold_plan.decide` asks these where the layer before a BatchNormalization is
not linear.
"""

import keras
import numpy as np

from bnseq import kinds
from bnseq import probes
from bnseq.deciding import fold_math
from bnseq.deciding import guards

_AVERAGING = (
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
)
_MAXIMUM = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
)


def through_pooling(graph, pool, bn, axes_of_graph):
    """(the linear layer `bn` folds into through pooling layer `pool`, None), or (None, why not or "").

    Pooling acts on each channel alone, so a per-channel affine map `scale * x
    + shift` after it equals the same map before it: exactly for averages
    (the weights of an average sum to 1, padded positions included or not),
    and for a maximum where every channel's `scale` is 0 or more. Moved
    before the pooling, the BatchNormalization folds into the linear layer
    there, as it would right after it. `axes_of_graph()` gives the graph's
    channel axes (`layout.axes_of_graph`).
    """
    if pool is None or not isinstance(pool, _AVERAGING + _MAXIMUM) or not kinds.is_keras_class(type(pool)):
        return None, ""
    linear = graph.sole_producer(pool)
    if linear is None:
        return None, ""
    if not kinds.is_linear(linear):
        # an operation's name is numbered anew in each process: named by its kind alone
        before = kinds.describe(linear) if isinstance(linear, keras.layers.Layer) else f"a {type(linear).__name__} call"
        return None, f"{kinds.describe(pool)} follows {before}, which is not a linear layer"
    described = kinds.describe(linear)
    if not kinds.is_identity(linear.activation):
        return None, f"{described} applies its activation before {kinds.describe(pool)}"
    if not graph.feeds_only(pool, bn) or graph.calls_of(pool) != 1:
        return None, f"the output of {kinds.describe(pool)} is also used elsewhere"
    if not graph.feeds_only(linear, pool):
        return None, f"the output of {described} is also used elsewhere"
    if graph.apart(linear, pool, bn):
        return None, f"{described} is in a different model, called more than once"
    rank = kinds.output_rank(linear)
    channels = kinds.channel_axis(linear) % rank
    pooled = 1 if getattr(pool, "data_format", "channels_last") == "channels_first" else rank - 1
    if channels != pooled:
        return None, f"{kinds.describe(pool)} pools along the channel axis of {described}"
    shape = graph.output_shape(bn)
    expected = axes_of_graph().get(id(bn))
    if shape is None or expected is None or not kinds.same_axis(bn.axis, expected, len(shape)):
        return None, f"its axis {bn.axis} is not the channel axis of {described}"
    if isinstance(pool, _MAXIMUM):
        scale, _ = fold_math.affine_of(bn)
        negative = [int(index) for index in np.flatnonzero(scale < 0)]
        if negative:
            listed = ", ".join(str(index) for index in negative[:8]) + (" ..." if len(negative) > 8 else "")
            return None, (
                f"a maximum commutes with its scale only where the scale is not negative, and channel"
                f"{'s' if len(negative) > 1 else ''} {listed} of its {len(scale)} "
                f"{'have' if len(negative) > 1 else 'has'} a negative gamma / sqrt(variance + epsilon)"
            )
    if guards.bias_lands_on_the_wrong_axis(linear, graph.output_shape(linear)):
        return None, f"{described} would need a bias this backend adds on the wrong axis"
    why = kinds.why_not_copied(linear)
    if why is not None:
        return None, f"{described} cannot be re-created from its config: {why}"
    return linear, None


_MERGES = (keras.layers.Add, keras.layers.Concatenate)


def is_merge(operation):
    """Whether `operation` is Keras's `Add` or `Concatenate` layer, or a `keras.ops.add` of two tensors."""
    if isinstance(operation, _MERGES):
        return kinds.is_keras_class(type(operation))
    return type(operation).__name__ == "Add" and not isinstance(operation, keras.layers.Layer)


def through_merge(graph, merge, bn, axes_of_graph):
    """(the linear layers `bn` splits into across `merge`, in input order, None), or (None, why not or "").

    After `Add`, `scale * (a + b) + shift = (scale * a + shift) + scale * b`:
    every input takes the scale and the first also the shift. After
    `Concatenate` along the channel axis, each input takes its own channels'
    scale and shift. Each input must be a linear layer with the identity
    activation that only the merge reads, so that the folded layers change
    nothing else.
    """
    if merge is None or not is_merge(merge):
        return None, ""
    described = kinds.describe(merge)
    if not graph.feeds_only(merge, bn) or graph.calls_of(merge) != 1:
        return None, f"the output of {described} is also used elsewhere"
    (call,) = [call for call in graph.flat.calls if call.operation is merge]
    linears = graph.producers(merge)
    if len(linears) != len(call.inputs) or not linears:
        return None, f"an input of {described} is a model input, or one layer's output is merged twice"
    shape = graph.output_shape(bn)
    expected = axes_of_graph().get(id(bn))
    if shape is None or expected is None or not kinds.same_axis(bn.axis, expected, len(shape)):
        return None, f"its axis {bn.axis} is not the channel axis of what {described} merges"
    for linear in linears:
        name = kinds.describe(linear)
        if not kinds.is_linear(linear):
            return None, f"{described} merges {name}, which is not a linear layer"
        if not kinds.is_identity(linear.activation):
            return None, f"{name} applies its activation before {described}"
        if not graph.feeds_only(linear, merge) or graph.calls_of(linear) != 1:
            return None, f"the output of {name} is also used elsewhere"
        if graph.apart(linear, merge, bn):
            return None, f"{name} is in a different model, called more than once"
        own = graph.output_shape(linear)
        if own is None or kinds.channel_axis(linear) % len(own) != expected % len(shape):
            return None, f"the channel axis of {name} is not the one it normalizes"
        if not isinstance(merge, keras.layers.Concatenate) and tuple(own) != tuple(shape):
            return None, f"{described} broadcasts {name}"
        if guards.bias_lands_on_the_wrong_axis(linear, own):
            return None, f"{name} would need a bias this backend adds on the wrong axis"
        why = kinds.why_not_copied(linear)
        if why is not None:
            return None, f"{name} cannot be re-created from its config: {why}"
    if isinstance(merge, keras.layers.Concatenate) and merge.axis % len(shape) != expected % len(shape):
        return None, f"{described} concatenates along axis {merge.axis}, not the channel axis"
    if not isinstance(merge, keras.layers.Concatenate) and _meets_the_bad_fusion(graph, linears, bn):
        return None, guards.FUSION_REASON.format(layer=kinds.describe(linears[0]))
    return linears, None


def _meets_the_bad_fusion(graph, linears, bn):
    """Whether folded linear layers with a bias, then the add, then `bn`'s consumer would meet oneDNN's bad fusion."""
    if probes.leaky_relu_fusion_is_sound() or all(isinstance(each, keras.layers.Dense) for each in linears):
        return False
    return any(guards.is_leaky_relu(consumer) for consumer in graph.consumers(bn))


def split_parts(graph, merge, bn, linears):
    """For each of `linears`, the `fold_math.Part` of `bn` that folds into it across `merge`."""
    if not isinstance(merge, keras.layers.Concatenate):
        return [fold_math.Part(bn, shift=index == 0) for index in range(len(linears))]
    parts, start = [], 0
    shape = graph.output_shape(bn)
    axis = bn.axis % len(shape)
    for linear in linears:
        channels = graph.output_shape(linear)[axis]
        parts.append(fold_math.Part(bn, channels=slice(start, start + channels)))
        start += channels
    return parts
