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
        """BatchNormalization layers inside a leaf that no walk can see into (see `hidden_batch_norms`)."""
        return hidden_batch_norms(layer)

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
    flat = flatten(model)
    layers, parents = [], {}
    producers, consumers = collections.defaultdict(list), collections.defaultdict(list)
    behind = {}  # Ref -> the leaf that produced it (model inputs have none)
    for call in flat.calls:
        operation = call.operation
        if id(operation) not in parents:
            parents[id(operation)] = call.parent
            layers.append(operation)
        for ref in call.inputs:
            source = behind.get(ref)
            if source is not None and not any(each is source for each in producers[id(operation)]):
                producers[id(operation)].append(source)
                consumers[id(source)].append(operation)
        for ref in call.outputs:
            behind[ref] = operation
    return Graph(
        layers=layers,
        outputs=[behind[ref] for ref in flat.outputs if ref in behind],
        parents=parents,
        _producers=producers,
        _consumers=consumers,
    )


class Ref:
    """One tensor of a flattened model: a model input or one output of a call.

    Compared by identity; `name` is only for reading.
    """

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Ref({self.name!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """One call of a leaf operation in a flattened model.

    Attributes:
        operation: the leaf (a layer, or a `keras.ops` operation).
        parent: `keras.Model`. The model that holds the call directly.
        args: tuple. The positional arguments, with a `Ref` for each tensor.
        kwargs: dict. The keyword arguments, likewise.
        inputs: tuple of `Ref`. The tensors the call reads.
        outputs: tuple of `Ref`. What it returns, flattened (one `Ref` for
            the whole result of a layer in a Sequential model).
    """

    operation: object
    parent: object
    args: tuple
    kwargs: dict
    inputs: tuple
    outputs: tuple


@dataclasses.dataclass
class Flat:
    """A model with the models nested in it flattened away: its leaf calls in order.

    A model nested twice (a siamese tower) gives two calls of each of its
    layers, reading and writing different `Ref`s.

    Attributes:
        inputs: list of `Ref`. One per tensor of `model.inputs`; a single one
            for a subclassed model, for its whole input.
        calls: list of `Call`, producers before consumers.
        outputs: list of `Ref`. The model's outputs, flattened.
    """

    inputs: list
    calls: list
    outputs: list

    def batch_norms(self):
        """Every BatchNormalization called, once each, in call order.

        Those hidden in a subclassed layer come just before that layer.
        """
        found = {}
        for call in self.calls:
            for layer in hidden_batch_norms(call.operation):
                found.setdefault(id(layer), layer)
            if isinstance(call.operation, keras.layers.BatchNormalization):
                found.setdefault(id(call.operation), call.operation)
        return list(found.values())


def flatten(model):
    """Read `model` into a `Flat` list of leaf calls (see `walk` for the models read)."""
    flattener = _Flattener()
    if isinstance(model, keras.Sequential) or not is_functional(model):
        inputs = [Ref("input")]
    else:
        inputs = [Ref(tensor.name) for tensor in model.inputs]
    outputs = flattener.model(model, inputs, parent=None, args=(inputs[0],) if len(inputs) == 1 else (inputs,))
    return Flat(inputs=inputs, calls=flattener.calls, outputs=outputs)


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


def hidden_batch_norms(layer):
    """BatchNormalization layers inside a leaf that no walk can see into.

    A subclassed layer or model is one leaf: its `call()` has no graph.
    """
    if not isinstance(layer, keras.Layer) or isinstance(layer, keras.layers.BatchNormalization):
        return []
    return [each for each in inner_layers(layer) if isinstance(each, keras.layers.BatchNormalization)]


def inner_layers(layer):
    """Every layer inside `layer` (not itself), for one whose insides no walk can see.

    `Layer._flatten_layers` is private Keras API; no public one lists the
    layers a subclassed layer or model holds (checked on Keras 3.14 and 3.15).
    """
    return list(layer._flatten_layers(include_self=False))


def _calls(model):
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


class _Flattener:
    def __init__(self):
        self.calls = []

    def call(self, operation, args, kwargs, sources, parent, count=1):
        """Record `operation` called on `sources`; the `Ref`s of what it returns."""
        if isinstance(operation, keras.Model) and (isinstance(operation, keras.Sequential) or is_functional(operation)):
            return self.model(operation, sources, parent, args)
        outputs = tuple(Ref(f"{operation.name}:{index}") for index in range(max(count, 1)))
        self.calls.append(Call(operation, parent, args, kwargs, tuple(sources), outputs))
        return outputs

    def model(self, model, sources, parent, args):
        """Flatten one model fed by `sources`; the `Ref`s of its outputs."""
        if isinstance(model, keras.Sequential):
            ref = sources[0] if sources else Ref(f"{model.name}:input")
            for layer in model.layers:
                (ref,) = self.call(layer, (ref,), {}, [ref], parent=model)
            return [ref]
        if not is_functional(model):  # a subclassed model at the top: one opaque leaf
            return list(self.call(model, args, {}, sources, parent))
        behind = {id(tensor): source for tensor, source in zip(model.inputs, sources)}

        def ref_of(value):
            if isinstance(value, keras.KerasTensor):
                if id(value) not in behind:  # an input the caller did not feed
                    behind[id(value)] = Ref(value.name)
                return behind[id(value)]
            return value

        for operation, (call_args, call_kwargs), inputs, outputs in _calls(model):
            results = self.call(
                operation,
                keras.tree.map_structure(ref_of, call_args),
                keras.tree.map_structure(ref_of, call_kwargs),
                [ref_of(tensor) for tensor in inputs],
                parent=model,
                count=len(outputs),
            )
            for index, tensor in enumerate(outputs):
                behind[id(tensor)] = results[min(index, len(results) - 1)]
        return [ref_of(tensor) for tensor in keras.tree.flatten(model.outputs)]
