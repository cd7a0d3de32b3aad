"""`bnseq.lint`: find misplaced BatchNormalization in any Keras model.

The rules, one code each (the same rules `bnseq.Sequential` warns about when a
BatchNormalization is added):

`BN001`, a bias before BatchNormalization. The normalization subtracts the
batch mean of each channel, so a bias added just before it is cancelled, and
its parameters are wasted; BatchNormalization's own `beta` is the offset::

    layers.Conv2D(64, 3)                    # BN001: 64 wasted parameters
    layers.BatchNormalization()
    # instead: layers.Conv2D(64, 3, use_bias=False), layers.BatchNormalization()

`BN002`, BatchNormalization after a nonlinearity: the producer's own
activation, or an activation layer (`Activation`, `ReLU`, `LeakyReLU`,
`PReLU`, `ELU`, `Softmax`), or an activation written as an operation
(`keras.ops.silu(x)`, `keras.activations.gelu(x)`). It belongs between the
linear layer and its activation::

    layers.Dense(100, activation="relu")    # BN002
    layers.BatchNormalization()
    # instead: layers.Dense(100, use_bias=False), layers.BatchNormalization(),
    #          layers.Activation("relu")

`BN003`, the wrong axis: the BatchNormalization's axis is not the channel
axis of the linear layer that feeds it. The model trains, silently
normalizing the wrong features::

    layers.Conv2D(64, 3, data_format="channels_first", use_bias=False)
    layers.BatchNormalization()             # BN003: axis -1, channels on 1
    # instead: layers.BatchNormalization(axis=1)

`BN004`, BatchNormalization directly after BatchNormalization: the second
normalizes what the first already normalized (often a port of code that
already normalizes, into a model that normalizes for it)::

    layers.BatchNormalization()
    layers.BatchNormalization()             # BN004: keep one

`BN000`, a part of the model lint cannot see into: a subclassed layer or
model that holds BatchNormalization layers and could not be traced (see
`bnseq/trace.py`; the message says why). Their placement is not judged, and
lint says so rather than passing them silently. Subclassed layers that trace
(most keras-hub blocks) are read like any functional model.

A BatchNormalization fed by anything else (a merge, a pooling layer, a model
input, several layers) is not a finding.

The fine-tuning rules (`fine_tuning.py`) judge what `fit` will do rather than
where the layer sits: `BN005`, a recorded `training=False` that the installed
Keras overrides in `fit` (the transfer-learning guide's `base(x,
training=False)` in Keras 3.0 to 3.15); `BN006`, `trainable` changed after the
train step was compiled (TensorFlow still trains the layer, JAX raises);
`BN007`, a BatchNormalization that trains inside a model or layer frozen
otherwise; `BN008`, training batches of fewer than 8 examples.
"""

import dataclasses

import keras

from bnseq import kinds
from bnseq.deciding import fine_tuning
from bnseq.deciding import rules
from bnseq.reading import files
from bnseq.reading import graph as graph_module
from bnseq.reading import layout
from bnseq.reading import partial


@dataclasses.dataclass(frozen=True)
class Finding:
    """One misplaced BatchNormalization.

    Attributes:
        code: str. The rule: `BN000` to `BN008`.
        layer: str. The BatchNormalization's name; for `BN000`, the name of
            the layer lint cannot see into.
        message: str. What is wrong, what it costs, what to write instead.
        producer: str or None. The name of the layer that feeds the
            BatchNormalization (the same word as `FoldDecision.producer`);
            `None` for `BN000` and the fine-tuning rules `BN005` to `BN008`.
    """

    code: str
    layer: str
    message: str
    producer: str

    def __str__(self):
        return f"{self.layer}: {self.code} {self.message}"


def lint(model_or_path, *, safe_mode=True, batch_size=None):
    """Find misplaced BatchNormalization layers in a model.

    Never changes the model. Models nested in the model are read through, so a
    BatchNormalization is judged by the layer that really feeds it.

    Args:
        model_or_path: `keras.Model` (Sequential from Keras or bnseq,
            functional, subclasses built from inputs and outputs such as
            keras-hub backbones, with nested models), or the path of a
            `.keras` file (loaded without compiling; `import bnseq` has made
            bnseq's own classes loadable).
        safe_mode: bool. Keras's `safe_mode` for loading a file: `False` for
            a trusted file with `Lambda` layers.
        batch_size: int, optional. The batch size `fit` will train with,
            for `BN008` (otherwise only a batch size the model's inputs fix
            is known).

    Returns:
        list of `Finding`, in the model's order; empty when all is well.

    Raises:
        TypeError: if `model_or_path` is neither a model nor a path.
        FileNotFoundError: if the path does not exist.
        ValueError: if the file is not a Keras model Keras can load.

    Examples:
        >>> model = keras.Sequential([
        ...     keras.Input((4,)),
        ...     keras.layers.Dense(8, activation="relu", name="hidden"),
        ...     keras.layers.BatchNormalization(name="bn"),
        ... ])
        >>> for finding in bnseq.lint(model):
        ...     print(finding.code, finding.layer, finding.producer)
        BN001 bn hidden
        BN002 bn hidden
    """
    model = files.as_model(model_or_path, safe_mode=safe_mode)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"lint: `batch_size` is a positive integer. Received: batch_size={batch_size!r}")
    return lint_graph(model, graph_module.walk(model), batch_size=batch_size)


def lint_graph(model, graph, context=None, *, batch_size=None):
    """Every finding of `model`, read as `graph` (`graph.walk(model)`): placement first, then fine-tuning."""
    return _findings(graph) + fine_tuning_findings(model, context, batch_size=batch_size)


def fine_tuning_findings(model, context=None, *, batch_size=None):
    """BN005 to BN008 of `model` as `Finding`s (see `fine_tuning.py`)."""
    return fine_tuning.findings(
        model,
        context,
        batch_size=batch_size,
        finding=lambda code, layer, message: Finding(code, layer.name, message, None),
    )


def _findings(graph):
    """The findings of one graph; an opaque leaf is read through its sublayers that can be (`partial`)."""
    axes = layout.axes_of_graph(graph)
    findings = []
    for layer in graph.layers:
        if graph.hidden_batch_norms(layer):
            parts, unseen = partial.parts_of(layer)
            for part in parts:
                findings.extend(_findings(part.graph))
            if unseen:
                findings.append(_unseen(graph, layer, unseen, parts))
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        producer = graph.sole_producer(layer)
        misplaced_axis = _axis_problem(graph, axes, layer, producer)
        if misplaced_axis is not None:
            findings.append(Finding("BN003", layer.name, misplaced_axis, getattr(producer, "name", None)))
        if producer is None:
            continue
        # The bias is wasted only if every user of the output normalizes it.
        shared = any(output is producer for output in graph.outputs) or not all(
            isinstance(each, keras.layers.BatchNormalization) for each in graph.consumers(producer)
        )
        for code, message in rules.placement_problems(producer, layer, shared=shared):
            findings.append(Finding(code, layer.name, message, producer.name))
    return findings


def _unseen(graph, layer, unseen, parts):
    kind = "model" if isinstance(layer, keras.Model) else "layer"
    read = ""
    if parts:
        names = ", ".join(repr(part.layer.name) for part in parts)
        read = f" Its sublayers {names} were read on their own; these are outside them."
    return Finding(
        "BN000",
        layer.name,
        f"cannot inspect {kinds.describe(layer)}: subclassed {kind} with "
        f"{len(unseen)} BatchNormalization layer{'s' if len(unseen) > 1 else ''} "
        f"({', '.join(repr(each.name) for each in unseen)}), and {graph.why_opaque(layer)}; "
        f"their placement is not checked.{read}",
        None,
    )


def _axis_problem(graph, axes, bn, producer):
    """BN003 where the channels reach `bn` through layers that are not linear (merges, pooling, Permute...).

    After a linear layer `rules.placement_problems` says it; here the axis
    comes from `layout.py`'s propagation, and an unknown one says nothing.
    """
    if producer is not None and kinds.is_linear(producer):
        return None
    expected = axes.get(id(bn))
    shape = graph.output_shape(bn)
    if expected is None or shape is None or kinds.same_axis(bn.axis, expected, len(shape)):
        return None
    written = -1 if expected == len(shape) - 1 else expected
    source = f"{kinds.describe(producer)} and the layers before it" if producer is not None else "its inputs"
    return (
        f"{kinds.describe(bn)} normalizes axis {bn.axis}, but the channels of its input are on axis "
        f"{written} (read through {source}). Write `BatchNormalization(axis={written})`."
    )
