"""One walker over Keras models: which layer feeds which.

`walk(model)` reads a Sequential or functional model, with models nested in
models flattened away, into a `Graph` of its leaf operations (layers, and the
`keras.ops` calls of a functional model) and the producer -> consumer edges
between them. `lint`, `fold` and `batch_normalize` all read models through it.

Functional models are read from their config (`get_config()`), whose
`inbound_nodes` / `keras_history` entries are the format Keras saves models in
and keeps loadable across releases, rather than from Keras's private node
objects.
"""

import collections
import dataclasses
import os
import zipfile

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


def functional_config(model):
    """A functional model's config, or `None` for any other model.

    Keras has no public test for "functional"; its functional models are the
    ones whose config lists `input_layers` and `layers`.
    """
    try:
        config = model.get_config()
    except (NotImplementedError, TypeError):
        return None
    if isinstance(config, dict) and "input_layers" in config and "layers" in config:
        return config
    return None


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
        config = functional_config(model)
        if config is None:  # a subclassed model: one opaque leaf
            return self.leaf(model, sources or [], parent)
        operations = {operation.name: operation for operation in model.operations}
        results = {}  # (name, node index) -> the leaf behind each output tensor
        for key, source in zip(_histories(config["input_layers"]), sources or []):
            results[key[:2]] = [source]
        # Config order is by layer; a shared layer's later calls can refer to
        # layers listed after it, so nodes are taken as their inputs are ready.
        pending = [
            (layer_config["name"], node_index, _histories(node))
            for layer_config in config["layers"]
            if not isinstance(operations[layer_config["name"]], keras.layers.InputLayer)
            for node_index, node in enumerate(layer_config["inbound_nodes"])
        ]
        inputs_of_model = {key[:2] for key in _histories(config["input_layers"])}
        while pending:
            waiting = []
            for name, node_index, keys in pending:
                if all(key[:2] in results or key[:2] in inputs_of_model for key in keys):
                    inputs = [_lookup(results, key) for key in keys]
                    operation = operations[name]
                    results[(name, node_index)] = self.call(operation, inputs, parent=model)
                else:
                    waiting.append((name, node_index, keys))
            if len(waiting) == len(pending):
                raise ValueError(
                    f"Cannot order the layers of model '{model.name}': its config "
                    "refers to layer calls it does not contain."
                )
            pending = waiting
        return [_lookup(results, key) for key in _histories(config["output_layers"])]

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


def _histories(node):
    """The `(layer name, node index, tensor index)` keys a config entry refers to."""
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            return [tuple(node["config"]["keras_history"])]
        return [key for value in node.values() for key in _histories(value)]
    if isinstance(node, (list, tuple)):
        if len(node) == 3 and isinstance(node[0], str) and isinstance(node[1], int):
            return [tuple(node)]
        return [key for value in node for key in _histories(value)]
    return []


def _lookup(results, key):
    name, node_index, tensor_index = key
    outputs = results.get((name, node_index), [None])
    return outputs[min(tensor_index, len(outputs) - 1)]


def as_model(model_or_path):
    """A model given as itself or as the path of a `.keras` file.

    Raises:
        TypeError: for anything else.
        FileNotFoundError: if the path does not exist.
        IsADirectoryError: if the path is a directory.
        ValueError: if the file is not a model Keras can load.
    """
    if isinstance(model_or_path, keras.Model):
        return model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(
            "Expected a keras.Model or the path of a .keras file. "
            f"Received: {model_or_path!r} (of type {type(model_or_path).__name__})"
        )
    path = os.fspath(model_or_path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"'{path}' is a directory, not a .keras file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file: '{path}'")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"'{path}' is not a .keras file (a .keras file is a zip archive "
            "written by `model.save()`)."
        )
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many kinds for a bad archive
        raise ValueError(f"Keras cannot load '{path}': {error}") from error
