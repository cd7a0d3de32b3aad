"""What `bnseq.fold` will do with each BatchNormalization, decided on a read model.

For each BatchNormalization: fold back into the linear layer before it, fold
forward into the one after it, or stay, with the reason in one line
(`FoldDecision`, `bnseq.fold_report`). The decisions read the graph and the
layers; they build nothing (`changing/folding.py` applies them).
"""

import dataclasses

import keras

from bnseq import kinds
from bnseq.deciding import fold_math
from bnseq.deciding import fold_through
from bnseq.deciding import guards
from bnseq.reading import files
from bnseq.reading import graph as graph_module
from bnseq.reading import layout
from bnseq.reading import partial


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
        through: str or None. For one that follows a pooling layer fed by a
            linear layer: the pooling layer it moves before (a per-channel
            affine map commutes with averaging, and with a maximum where its
            scale is not negative) to fold into that linear layer, which
            `producer` then names. For one folded forward across a `Flatten`
            or `Reshape` into a Dense layer: that layer. `None` otherwise.
        composed: str or None. For one right after another
            BatchNormalization that folds back into `producer`: that one's
            name (two affine maps in a row are one, and both fold into the
            same layer); `None` otherwise.
        split: tuple of str or None. For one after an `Add` or a
            `Concatenate` of linear layers that only it reads: those layers,
            each of which takes its part (`through` names the merge); `None`
            otherwise.
    """

    batch_norm: str
    producer: object
    folded: bool
    reason: str
    into: object = None
    through: object = None
    composed: object = None
    split: object = None

    def __str__(self):
        if self.folded and self.split is not None:
            return f"{self.batch_norm}: split across {self.through} and folded into {', '.join(self.split)}"
        if self.folded and self.into is not None:
            across = "" if self.through is None else f", across {self.through}"
            return f"{self.batch_norm}: folded forward into {self.into}{across}"
        if self.folded and self.composed is not None:
            return f"{self.batch_norm}: folded into {self.producer}, with {self.composed} before it"
        if self.folded and self.through is not None:
            return f"{self.batch_norm}: folded into {self.producer}, moved before {self.through}"
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
    return [decision for _, _, decision, _ in decide(graph_module.walk(model))]


def decide(graph):
    """(BatchNormalization, producer or None, FoldDecision, consumer or None) for each one.

    A BatchNormalization folds back into the linear layer that feeds it, or,
    where it cannot, forward into the linear layer that alone takes its output.
    """
    decisions = []
    folded_back = {}  # id(BatchNormalization) -> the linear layer it folds back into, right after it
    axes = {}

    def axes_of_graph():  # the channel axes, worked out once, where a fold through pooling asks
        if not axes:
            axes.update(layout.axes_of_graph(graph))
        return axes

    for layer in graph.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            if graph.hidden_batch_norms(layer):
                decisions.extend(_inside(graph, layer))
            continue
        producer = graph.sole_producer(layer)
        if id(producer) in folded_back and _composes(graph, producer, layer):
            linear = folded_back[id(producer)]
            folded_back[id(layer)] = linear
            decision = FoldDecision(layer.name, linear.name, True, "", composed=producer.name)
            decisions.append((layer, linear, decision, None))
            continue
        reason = _why_not(graph, producer, layer)
        name = None if producer is None else producer.name
        if reason is None:
            folded_back[id(layer)] = producer
            decisions.append((layer, producer, FoldDecision(layer.name, name, True, ""), None))
            continue
        linear, why_not_through = fold_through.through_pooling(graph, producer, layer, axes_of_graph)
        if linear is not None:
            decisions.append(
                (layer, linear, FoldDecision(layer.name, linear.name, True, "", through=kinds.describe(producer)), None)
            )
            continue
        if not why_not_through:
            linears, why_not_through = fold_through.through_merge(graph, producer, layer, axes_of_graph)
            if linears is not None:
                split = tuple(linear.name for linear in linears)
                decision = FoldDecision(layer.name, name, True, "", through=kinds.describe(producer), split=split)
                decisions.append((layer, linears, decision, None))
                continue
        if why_not_through:
            reason += f"; nor through it: {why_not_through}"
        consumer, why_not_forward_reason = forward_target(graph, layer)
        if consumer is not None:
            across = graph.sole_producer(consumer)
            across = None if across is layer else kinds.describe(across)
            decision = FoldDecision(layer.name, name, True, "", into=consumer.name, through=across)
            decisions.append((layer, None, decision, consumer))
            continue
        if why_not_forward_reason:
            reason += f"; nor forward: {why_not_forward_reason}"
        decisions.append((layer, None, FoldDecision(layer.name, name, False, reason), None))
    for layer in graph.uncalled:
        decisions.append((layer, None, FoldDecision(layer.name, None, False, "it is never called"), None))
    return decisions


def _inside(graph, layer):
    """Decisions for the BatchNormalization layers inside an opaque leaf: each kept, saying what bnseq saw.

    Those inside a sublayer that can be read on its own (`partial`) say what
    would fold there; `fold` cannot rebuild the block around the sublayer.
    """
    where = f"it is inside {kinds.describe(layer)}, and {graph.why_opaque(layer)}"
    parts, unseen = partial.parts_of(layer)
    decisions = []
    for part in parts:
        for bn, _, decision, _ in decide(part.graph):
            if not any(bn is each for each in part.batch_norms()):
                continue  # deeper still, unseen: listed below
            through = f"read through {kinds.describe(part.layer)}"
            if decision.folded:
                seen = f"{through}, it would fold into {decision.into or decision.producer}"
            else:
                seen = f"{through}, it is kept there too: {decision.reason}"
            reason = f"{where}; {seen}, but fold cannot rebuild {kinds.describe(layer)} around it"
            decisions.append((bn, None, FoldDecision(bn.name, layer.name, False, reason), None))
    for bn in unseen:
        decisions.append((bn, None, FoldDecision(bn.name, layer.name, False, where), None))
    return decisions


def _composes(graph, first, second):
    """Whether `second`, right after `first` (which folds back into the linear layer before it), folds there too."""
    if not graph.feeds_only(first, second) or graph.calls_of(first) != 1:
        return False
    if graph.apart(first, second):
        return False
    shape = graph.output_shape(first)
    if shape is None or not kinds.same_axis(second.axis, first.axis % len(shape), len(shape)):
        return False
    linear = graph.sole_producer(first)
    return not guards.fuses_wrongly(graph, linear, activation_after(graph, second) or second)


def forward_target(graph, bn):
    """(the linear layer `bn` can fold forward into, None), or (None, why not or "")."""
    consumers = graph.consumers(bn)
    if len(consumers) != 1 or not graph.feeds_only(bn, consumers[0]):
        return None, ""
    (consumer,) = consumers
    if _flattens(consumer):
        return _across_flattening(graph, bn, consumer)
    if not kinds.is_linear(consumer):
        return None, ""
    if graph.producers(consumer) != [bn] or graph.calls_of(consumer) != 1:
        return None, f"{kinds.describe(consumer)} also takes other inputs"
    if graph.apart(consumer, bn):
        return None, f"{kinds.describe(consumer)} is in a different model, called more than once"
    reason = fold_math.why_not_forward(consumer)
    if reason is not None:
        return None, reason
    shape = graph.output_shape(bn)
    rank = len(shape) if shape is not None else kinds.output_rank(consumer)
    expected = -1 if isinstance(consumer, keras.layers.Dense) else kinds.channel_axis(consumer)
    if not kinds.same_axis(bn.axis, expected, rank):
        return None, f"its axis {bn.axis} is not the input channel axis of {kinds.describe(consumer)}"
    if not consumer.use_bias and guards.bias_lands_on_the_wrong_axis(consumer, graph.output_shape(consumer)):
        return None, f"{kinds.describe(consumer)} would need a bias this backend adds on the wrong axis"
    if not consumer.use_bias and guards.fuses_wrongly(graph, consumer, consumer):
        return None, guards.FUSION_REASON.format(layer=kinds.describe(consumer))
    return consumer, None


def _flattens(layer):
    """Whether `layer` is Keras's Flatten, or a Reshape to one axis of features."""
    if type(layer) is keras.layers.Flatten:
        return True
    return type(layer) is keras.layers.Reshape and len(layer.target_shape) == 1


def _across_flattening(graph, bn, flattening):
    """(the Dense layer `bn` folds forward into across `flattening`, None), or (None, why not or "").

    Flattening moves values, never mixes them: each feature of the Dense
    layer's input is one position of one channel, so the per-channel map
    folds into the kernel's rows, each scaled by its channel's scale
    (`folding.py` reads which channel each row is by flattening the channel
    indices).
    """
    consumers = graph.consumers(flattening)
    if len(consumers) != 1 or not graph.feeds_only(flattening, consumers[0]) or graph.calls_of(flattening) != 1:
        return None, f"the output of {kinds.describe(flattening)} is also used elsewhere"
    (dense,) = consumers
    if not isinstance(dense, keras.layers.Dense):
        return None, ""
    if graph.producers(dense) != [flattening] or graph.calls_of(dense) != 1:
        return None, f"{kinds.describe(dense)} also takes other inputs"
    if graph.apart(bn, flattening, dense):
        return None, f"{kinds.describe(dense)} is in a different model, called more than once"
    shape = graph.output_shape(bn)
    if shape is None or any(size is None for size in shape[1:]):
        return None, f"the shape it gives {kinds.describe(flattening)} is not fully known"
    reason = fold_math.why_not_forward(dense)
    if reason is not None:
        return None, reason
    return dense, None


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
    if graph.apart(producer, bn):
        return f"it is in a different model than {kinds.describe(producer)}, and one of them is called more than once"
    if not kinds.same_axis(bn.axis, kinds.channel_axis(producer), kinds.output_rank(producer)):
        return (
            f"its axis {bn.axis} is not the channel axis of "
            f"{kinds.describe(producer)}"
        )
    if guards.bias_lands_on_the_wrong_axis(producer, graph.output_shape(producer)):
        return (
            f"{kinds.describe(producer)} is channels_first with as many channels "
            "as its last spatial size, where this Keras backend adds a bias "
            "along the last axis in eager calls; folding would change the "
            "outputs"
        )
    why = kinds.why_not_copied(producer)  # folding re-creates it from its config
    if why is not None:
        return f"{kinds.describe(producer)} cannot be re-created from its config: {why}"
    activation = activation_after(graph, bn)
    if guards.fuses_wrongly(graph, producer, activation or bn):
        return guards.FUSION_REASON.format(layer=kinds.describe(producer))
    return None


def activation_after(graph, bn):
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
    if graph.calls_of(activation) != 1:  # one object used in several branches: the others need it too
        return None
    producer = graph.sole_producer(bn)
    if producer is not None and activation.dtype_policy.name != producer.dtype_policy.name:
        return None  # a float32 softmax after a bfloat16 layer, as mixed precision recommends: kept apart
    if graph.apart(activation, bn):
        return None
    return activation
