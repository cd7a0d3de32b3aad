"""Seeing into a subclassed layer that does not trace, through its sublayers that do.

A block whose `call()` cannot run on symbolic tensors (keras-hub's
`DFineHybridEncoder` builds positional embeddings with Python arithmetic on
its input's shape) stays one opaque leaf of the graph. Its
sublayers are often plain blocks that would trace on their own: D-FINE's
lateral convolutions, its FPN and PAN blocks, each a convolution and its
BatchNormalization. `parts_of(layer)` reads each such sublayer by itself, on
the input shapes it was built with (`get_build_config()`): a nested
Sequential or functional model by its graph, a subclassed layer by its trace,
and one that does not trace by its own sublayers in turn. What none of them
holds stays unseen, and is named.

A part is read as it runs alone; how the opaque block wires the parts together
is not known. So `lint` judges the placement of each BatchNormalization inside
a part, and `fold_report` says what would fold there, but `fold` cannot rebuild
the block around it and keeps it.
"""

import dataclasses

import keras

from bnseq import internals
from bnseq.reading import graph as graph_module
from bnseq.reading import trace as trace_module


@dataclasses.dataclass(eq=False)
class Part:
    """A sublayer of an opaque block, read by itself.

    Attributes:
        layer: `keras.Layer`. The sublayer.
        graph: `graph.Graph`. Its graph (its trace's, for a subclassed one).
    """

    layer: object
    graph: object

    def batch_norms(self):
        """The BatchNormalization layers this part calls where its graph shows them."""
        return [each for each in self.graph.layers if isinstance(each, keras.layers.BatchNormalization)]


def parts_of(layer):
    """`(parts, unseen)`: the readable sublayers of an opaque `layer`, and the BatchNormalization none of them shows.

    Examples:
        >>> class Encoder(keras.layers.Layer):  # its call() cannot be traced
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.lateral = keras.Sequential([keras.layers.Dense(4, use_bias=False),
        ...                                          keras.layers.BatchNormalization(name="seen")])
        ...         self.bn = keras.layers.BatchNormalization(name="unseen")
        ...     def build(self, shape):
        ...         self.lateral.build(shape)
        ...         self.bn.build(shape[:-1] + (4,))
        ...     def call(self, x):
        ...         return self.bn(self.lateral(x)) * float(x.shape[0])
        >>> encoder = Encoder()
        >>> encoder.build((None, 3))
        >>> parts, unseen = parts_of(encoder)
        >>> [bn.name for part in parts for bn in part.batch_norms()], [bn.name for bn in unseen]
        (['seen'], ['unseen'])
    """
    parts = []
    _descend(layer, parts)
    seen = {id(bn) for part in parts for bn in part.batch_norms()}
    unseen = [bn for bn in graph_module.hidden_batch_norms(layer) if id(bn) not in seen]
    return parts, unseen


def _descend(layer, parts):
    for child in internals.child_layers(layer):
        if isinstance(child, keras.layers.BatchNormalization) or not graph_module.hidden_batch_norms(child):
            continue
        if isinstance(child, keras.Sequential) or internals.is_functional(child):
            if _built(child):
                parts.append(Part(child, graph_module.walk(child)))
            continue
        if not trace_module.should_trace(child):
            continue  # one of Keras's own layers holding others (a wrapper): not read into
        specs = graph_module.built_input(child)
        traced = trace_module.trace(child, (specs,), {}) if specs is not None else None
        if traced is not None and traced.ok:
            parts.append(Part(child, graph_module.walk(traced.model)))
        else:
            _descend(child, parts)


def _built(model):
    try:
        return bool(model.inputs) if not isinstance(model, keras.Sequential) else model.built and bool(model.inputs)
    except (AttributeError, ValueError):
        return False
