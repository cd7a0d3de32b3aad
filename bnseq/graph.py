"""One walker over Keras models: which layer feeds which.

`walk(model)` reads a Sequential or functional model (a plain `keras.Model`
built from inputs and outputs, or a subclass built that way, as every keras-hub
Backbone is), with models nested in models flattened away, into a `Graph` of
its leaf operations (layers, and the `keras.ops` calls of a functional model)
and the producer -> consumer edges between them. `lint`, `fold_report`, `fold`
and `batch_normalize` all read models through it.

A functional model's calls are read from the graph Keras keeps for it (see
`_calls`), not from `get_config()`: a functional subclass's config holds its
constructor's arguments instead of its layers, and a custom layer without
`get_config` makes the whole config fail, while the graph is always there.
"""

import collections
import dataclasses

import keras


@dataclasses.dataclass
class Graph:
    """Leaf operations of a model and the edges between them.

    Attributes:
        layers: list. Every leaf operation once, producers before consumers.
        outputs: list. The leaf operations that produce the model's outputs.
        parents: dict. `id(layer)` -> the model that holds the layer directly.
    """

    layers: list
    outputs: list
    parents: dict
    _producers: dict
    _consumers: dict

    def producers(self, layer):
        """The leaf operations whose outputs `layer` takes (model inputs left out)."""
        return list(self._producers.get(id(layer), ()))

    def consumers(self, layer):
        """The leaf operations that take `layer`'s output."""
        return list(self._consumers.get(id(layer), ()))

    def sole_producer(self, layer):
        """The one leaf operation feeding `layer`, or `None` if not exactly one."""
        producers = self._producers.get(id(layer), ())
        return producers[0] if len(producers) == 1 else None

    def hidden_batch_norms(self, layer):
        """BatchNormalization layers inside a leaf that no walk can see into.

        A subclassed layer or model is one leaf: its `call()` has no graph.
        """
        if not isinstance(layer, keras.Layer) or isinstance(layer, keras.layers.BatchNormalization):
            return []
        return [each for each in inner_layers(layer) if isinstance(each, keras.layers.BatchNormalization)]

    def feeds_only(self, producer, consumer):
        """Whether `consumer` is the only user of `producer`'s output.

        A producer whose output is also a model output has another user.
        """
        return self.consumers(producer) == [consumer] and not any(
            output is producer for output in self.outputs
        )


def walk(model):
    """Read `model` into a `Graph`.

    Args:
        model: `keras.Model`. Sequential (from Keras or bnseq) or functional,
            possibly with models nested inside it. A subclassed model, which
            has no graph to read, is a single leaf.

    Returns:
        `Graph`.

    Example:

    >>> inputs = keras.Input((4,))
    >>> dense = keras.layers.Dense(3, name="d")
    >>> bn = keras.layers.BatchNormalization(name="bn")
    >>> model = keras.Model(inputs, bn(dense(inputs)))
    >>> graph = walk(model)
    >>> [layer.name for layer in graph.layers]
    ['d', 'bn']
    >>> graph.sole_producer(bn) is dense, graph.feeds_only(dense, bn)
    (True, True)
    """
    walker = _Walker()
    outputs = walker.model(model, sources=None)
    return Graph(
        layers=walker.layers,
        outputs=[source for source in outputs if source is not None],
        parents=walker.parents,
        _producers=walker.producers,
        _consumers=walker.consumers,
    )


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


def _calls(model):
    """The layer calls of a functional model, producers before consumers.

    Yields `(operation, input tensors, output tensors)` for each call, in
    Keras's own order (by depth, then by `model.operations`). This reads
    Keras's private graph state (`_nodes_by_depth`, a node's `operation`,
    `is_input`, `input_tensors`, `outputs`), the same state
    `keras.models.clone_model` replays; it is isolated here and was checked on
    Keras 3.14 and 3.15 (tests/test_graph.py fails loudly if it changes).
    """
    order = {id(operation): index for index, operation in enumerate(model.operations)}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        nodes = sorted(model._nodes_by_depth[depth], key=lambda node: order.get(id(node.operation), -1))
        for node in nodes:
            if node.is_input or node.operation is None:
                continue
            yield node.operation, list(node.input_tensors), keras.tree.flatten(node.outputs)


class _Walker:
    def __init__(self):
        self.layers = []
        self.parents = {}
        self.producers = collections.defaultdict(list)
        self.consumers = collections.defaultdict(list)

    def call(self, operation, sources, parent):
        """Record `operation` taking `sources`; the leaves behind its outputs."""
        if isinstance(operation, keras.Model):
            return self.model(operation, sources, parent)
        return self.leaf(operation, sources, parent)

    def model(self, model, sources, parent=None):
        """Walk one model; `sources` feed its inputs (`None` at the top)."""
        if isinstance(model, keras.Sequential):
            source = sources[0] if sources else None
            for layer in model.layers:
                (source,) = self.call(layer, [source], parent=model)
            return [source]
        if not is_functional(model):  # a subclassed model: one opaque leaf
            return self.leaf(model, sources or [], parent)
        behind = {}  # id(tensor) -> the leaf that produced it
        for tensor, source in zip(model.inputs, sources or []):
            behind[id(tensor)] = source
        for operation, inputs, outputs in _calls(model):
            results = self.call(operation, [behind.get(id(tensor)) for tensor in inputs], parent=model)
            for index, tensor in enumerate(outputs):
                behind[id(tensor)] = results[min(index, len(results) - 1)]
        return [behind.get(id(tensor)) for tensor in keras.tree.flatten(model.outputs)]

    def leaf(self, operation, sources, parent):
        if id(operation) not in self.parents:
            self.parents[id(operation)] = parent
            self.layers.append(operation)
        for source in sources:
            if source is None:
                continue
            if not any(each is source for each in self.producers[id(operation)]):
                self.producers[id(operation)].append(source)
                self.consumers[id(source)].append(operation)
        return [operation]
