"""One walker over Keras models: which layer feeds which.

`walk(model)` reads a Sequential or functional model (a plain `keras.Model`
built from inputs and outputs, or a subclass built that way, as every keras-hub
Backbone is), with models nested in models flattened away, into a `Graph` of
its leaf operations (layers, and the `keras.ops` calls of a functional model)
and the producer -> consumer edges between them. Subclassed layers and models
(keras-hub blocks, a user's `keras.Model` wired in `call()`) are traced into
graphs of their own (`trace.py`) and inlined in their place; one that does not
trace stays a leaf, with the reason kept. `lint`, `fold_report`, `fold`,
`batch_normalize`, `recalibrate` and `export` all read models through it.

A functional model's calls are read from the graph Keras keeps for it (see
`calls_of`), not from `get_config()`: a functional subclass's config holds its
constructor's arguments instead of its layers, and a custom layer without
`get_config` makes the whole config fail, while the graph is always there.
"""

import collections
import dataclasses

import keras

from bnseq import internals
from bnseq import kinds
from bnseq.reading import trace as trace_module


@dataclasses.dataclass
class Graph:
    """Leaf operations of a model and the edges between them.

    Attributes:
        layers: list. Every leaf operation once, producers before consumers.
        outputs: list. The leaf operations that produce the model's outputs.
        parents: dict. `id(layer)` -> the model that holds the layer directly.
        opaque: dict. `id(layer)` -> why a subclassed layer could not be
            traced (see `Flat.opaque`).
        uncalled: list. BatchNormalization layers that traced layers hold
            but never call.
        flat: `Flat`. The calls the graph was read from.
    """

    layers: list
    outputs: list
    parents: dict
    _producers: dict
    _consumers: dict
    opaque: dict = dataclasses.field(default_factory=dict)
    uncalled: list = dataclasses.field(default_factory=list)
    flat: object = None
    _output_specs: dict = dataclasses.field(default_factory=dict)

    def producers(self, layer):
        """The leaf operations whose outputs `layer` takes (model inputs left out)."""
        return list(self._producers.get(id(layer), ()))

    def consumers(self, layer):
        """The leaf operations that take `layer`'s output."""
        return list(self._consumers.get(id(layer), ()))

    def calls_of(self, layer):
        """How many times the flattened model calls `layer`."""
        return sum(1 for call in self.flat.calls if call.operation is layer)

    def sole_producer(self, layer):
        """The one leaf operation feeding `layer`, or `None` if not exactly one."""
        producers = self._producers.get(id(layer), ())
        return producers[0] if len(producers) == 1 else None

    def hidden_batch_norms(self, layer):
        """BatchNormalization layers inside a leaf that no walk can see into (see `hidden_batch_norms`)."""
        return hidden_batch_norms(layer)

    def output_shape(self, layer):
        """The shape of what `layer` returns (its first call's first output), or `None` if unknown."""
        spec = self._output_specs.get(id(layer))
        if spec is not None:
            return tuple(spec.shape)
        try:  # a layer of a Sequential model read without specs: Keras's own record of its call
            return tuple(layer.output.shape)
        except (AttributeError, ValueError):
            return None

    def why_opaque(self, layer):
        """Why a leaf holding BatchNormalization layers could not be seen into, in one line."""
        reason = self.opaque.get(id(layer))
        if reason:
            return f"it could not be traced: {reason}"
        if kinds.is_keras_class(type(layer)):
            return "it is a Keras layer whose call() bnseq does not trace"
        return "its call() has no graph"

    def apart(self, *layers):
        """Whether `layers` sit in different models and one of them is called more than once.

        A fold across a nested model's boundary changes what that model
        returns; where each layer is called once, nothing else sees it.
        """
        parents = {id(self.parents.get(id(layer))) for layer in layers}
        return len(parents) > 1 and any(self.calls_of(layer) != 1 for layer in layers)

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

    Examples:
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
    layers, parents, output_specs = [], {}, {}
    producers, consumers = collections.defaultdict(list), collections.defaultdict(list)
    behind = {}  # Ref -> the leaf that produced it (model inputs have none)
    for call in flat.calls:
        operation = call.operation
        if id(operation) not in parents:
            parents[id(operation)] = call.parent
            layers.append(operation)
            output_specs[id(operation)] = call.outputs[0].spec if call.outputs else None
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
        opaque=flat.opaque,
        uncalled=flat.uncalled,
        flat=flat,
        _output_specs=output_specs,
    )


class Ref:
    """One tensor of a flattened model: a model input or one output of a call.

    Compared by identity; `name` is only for reading.

    Attributes:
        name: str.
        spec: `keras.KerasTensor` or `None`. Its shape and dtype, where known
            (what tracing a subclassed layer called on it needs).
    """

    __slots__ = ("name", "spec")

    def __init__(self, name, spec=None):
        self.name, self.spec = name, spec

    def __repr__(self):
        return f"Ref({self.name!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """One call of a leaf operation in a flattened model.

    Attributes:
        operation: the leaf (a layer, or a `keras.ops` operation).
        parent: `keras.Model`. The model that holds the call directly (for
            a call inside a traced layer, the model that holds that layer).
        args: tuple. The positional arguments, with a `Ref` for each tensor.
        kwargs: dict. The keyword arguments, likewise.
        inputs: tuple of `Ref`. The tensors the call reads.
        outputs: tuple of `Ref`. What it returns, flattened (one `Ref` for
            the whole result of a layer in a Sequential model).
        scope: tuple of str. The names of the traced layers the call was
            inlined from, outermost first (empty for a call of the model's
            own graph): how a rebuild names a layer whose name clashes.
    """

    operation: object
    parent: object
    args: tuple
    kwargs: dict
    inputs: tuple
    outputs: tuple
    scope: tuple = ()


@dataclasses.dataclass
class Flat:
    """A model with the models nested in it flattened away: its leaf calls in order.

    A model nested twice (a siamese tower) gives two calls of each of its
    layers, reading and writing different `Ref`s. A subclassed layer or
    model that traces (`trace.py`) is replaced by the calls of its trace.

    Attributes:
        inputs: list of `Ref`. One per tensor of `model.inputs`; a single one
            for a subclassed model that does not trace, for its whole input.
        calls: list of `Call`, producers before consumers.
        outputs: list of `Ref`. The model's outputs, flattened.
        input_structure: the model's input as it is structured (a `Ref`, or
            a list or dict of them).
        output_structure: the model's output, likewise.
        opaque: dict. `id(layer)` -> why a subclassed layer (or model) that
            holds BatchNormalization or linear layers could not be traced.
        traced: bool. Whether any call was inlined from a trace.
        uncalled: list. BatchNormalization layers held by traced layers
            that their `call()` never calls.
    """

    inputs: list
    calls: list
    outputs: list
    input_structure: object = None
    output_structure: object = None
    opaque: dict = dataclasses.field(default_factory=dict)
    traced: bool = False
    uncalled: list = dataclasses.field(default_factory=list)

    def batch_norms(self):
        """Every BatchNormalization, once each: the called ones in call order.

        Those hidden in a subclassed layer that did not trace come just
        before that layer (in the order the layer created them: the order
        they run in is only known by running it), and those never called
        come last.
        """
        found = {}
        for call in self.calls:
            for layer in hidden_batch_norms(call.operation):
                found.setdefault(id(layer), layer)
            if isinstance(call.operation, keras.layers.BatchNormalization):
                found.setdefault(id(call.operation), call.operation)
        for layer in self.uncalled:
            found.setdefault(id(layer), layer)
        return list(found.values())


def flatten(model):
    """Read `model` into a `Flat` list of leaf calls (see `walk` for the models read)."""
    flattener = _Flattener()
    if isinstance(model, keras.Sequential):
        spec = _sequential_input(model)
        inputs = [Ref("input", spec)]
        structure = inputs[0]
        outputs = flattener.model(model, inputs, parent=None)
    elif internals.is_functional(model):
        inputs = [Ref(tensor.name, tensor) for tensor in model.inputs]
        structure = keras.tree.pack_sequence_as(model.input, inputs)
        outputs = flattener.model(model, inputs, parent=None)
    else:  # a subclassed model: traced from the shapes it was built with, or one opaque leaf
        specs = built_input(model)
        if specs is None:
            inputs = [Ref("input")]
            structure = inputs[0]
        else:
            leaves = keras.tree.flatten(specs)
            inputs = [Ref(f"input_{index}" if len(leaves) > 1 else "input", spec) for index, spec in enumerate(leaves)]
            structure = keras.tree.pack_sequence_as(specs, inputs)
        outputs = flattener.call(model, (structure,), {}, inputs, parent=None)
    if id(model) in flattener.traces:
        output_structure = keras.tree.pack_sequence_as(flattener.traces[id(model)].model.output, list(outputs))
    else:
        output_structure = _packed(model, outputs)
    flat = Flat(
        inputs=inputs,
        calls=flattener.calls,
        outputs=list(outputs),
        input_structure=structure,
        output_structure=output_structure,
        opaque=flattener.opaque,
        traced=flattener.traced,
    )
    flat.uncalled = _uncalled(model, flat)
    return flat


def _packed(model, outputs):
    """The output `Ref`s as `model`'s output is structured (a list when unknown)."""
    if internals.is_functional(model):
        try:
            return keras.tree.pack_sequence_as(model.output, list(outputs))
        except (ValueError, TypeError):
            pass
    return outputs[0] if len(outputs) == 1 else list(outputs)


def _uncalled(model, flat):
    """BatchNormalization layers of `model` that no call of `flat` runs or may run.

    Only a traced layer can hide one: Sequential and functional models hold
    the layers they call.
    """
    if not flat.traced:
        return []
    seen = set()
    for call in flat.calls:
        seen.add(id(call.operation))
        seen.update(id(each) for each in hidden_batch_norms(call.operation))
    return [
        layer
        for layer in internals.inner_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in seen
    ]


def _sequential_input(model):
    """The input spec of a built Sequential model, or `None`."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return inputs[0] if inputs else None


def built_input(model):
    """`keras.KerasTensor` specs of what a subclassed model was built with, or `None`.

    From `get_build_config()` (public Keras): the input shapes of the first
    call, structured as that call's input; the batch size is left open and
    the dtype is the model's input dtype.
    """
    try:
        config = model.get_build_config() or {}
    except Exception:  # a model overriding it oddly: no shapes
        return None
    shapes = config.get("input_shape")
    if shapes is None:
        return None

    def is_shape(value):
        return isinstance(value, (tuple, list)) and all(each is None or isinstance(each, int) for each in value)

    def spec(shape):
        return keras.KerasTensor((None, *tuple(shape)[1:]), dtype=model.input_dtype)

    def specs(value):
        if is_shape(value):
            return spec(value)
        if isinstance(value, dict):
            return {key: specs(each) for key, each in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(specs(each) for each in value)
        raise TypeError(value)

    try:
        return specs(shapes)
    except TypeError:
        return None


def hidden_batch_norms(layer):
    """BatchNormalization layers inside a leaf that no walk can see into.

    A leaf holding layers is a subclassed layer or model that was not traced
    (see `Flat.opaque` for why), or one of Keras's own layers.
    """
    if not isinstance(layer, keras.Layer) or isinstance(layer, keras.layers.BatchNormalization):
        return []
    if kinds.reads_as_leaf(layer):  # a QuantizedLinear computes with its BatchNormalization folded in
        return []
    return [each for each in internals.inner_layers(layer) if isinstance(each, keras.layers.BatchNormalization)]


class _Flattener:
    def __init__(self):
        self.calls = []
        self.opaque = {}  # id(layer) -> why it did not trace
        self.traces = {}  # id(layer) -> its Trace, for layers that traced
        self.traced = False
        self.scope = ()  # the traced layers being inlined, outermost first

    def call(self, operation, args, kwargs, sources, parent, outputs=None, single=False, spec=False):
        """Record `operation` called on `sources`; the `Ref`s of what it returns.

        `outputs`: the output tensors Keras recorded for the call (their
        specs), where known. `single`: the call is a layer of a Sequential
        model, whose one output `Ref` stands for all it returns. `spec`:
        without `outputs`, work out the output's spec (a layer after it may
        be traced, which needs its input's shape).
        """
        nested = isinstance(operation, keras.Sequential) or internals.is_functional(operation)
        if isinstance(operation, keras.Model) and nested:
            results = self.model(operation, sources, parent)
            # A nested Sequential's last Ref may have no spec; the outer call recorded it (a traced
            # layer after the nested model needs its input's shape).
            for ref, tensor in zip(results, list(outputs or ())):
                if ref.spec is None and isinstance(tensor, keras.KerasTensor):
                    ref.spec = tensor
            return results
        if trace_module.should_trace(operation):
            traced = self._trace(operation, args, kwargs)
            if traced is not None and single and len(traced.model.outputs) != 1:
                self.opaque.setdefault(id(operation), "it returns several tensors inside a Sequential model")
                traced = None
            if traced is not None:
                self.traces[id(operation)] = traced
                self.traced = True
                refs = [leaf for leaf in keras.tree.flatten((args, kwargs)) if isinstance(leaf, Ref)]
                outer, self.scope = self.scope, (*self.scope, operation.name)
                try:
                    return self.model(traced.model, refs, parent, inline=True)
                finally:
                    self.scope = outer
        specs = list(outputs) if outputs else [_output_spec(operation, args, kwargs) if spec else None]
        results = tuple(Ref(f"{operation.name}:{index}", spec) for index, spec in enumerate(specs))
        self.calls.append(Call(operation, parent, args, kwargs, tuple(sources), results, self.scope))
        return results

    def _trace(self, operation, args, kwargs):
        """The `Trace` of this call, or `None` (with the reason kept) when it does not trace."""
        refs = [leaf for leaf in keras.tree.flatten((args, kwargs)) if isinstance(leaf, Ref)]
        if not refs or any(ref.spec is None for ref in refs):
            self.opaque.setdefault(id(operation), "the shapes of its inputs are not known")
            return None
        specs = keras.tree.map_structure(lambda value: value.spec if isinstance(value, Ref) else value, (args, kwargs))
        traced = trace_module.trace(operation, *specs)
        if not traced.ok:
            self.opaque.setdefault(id(operation), traced.reason)
            return None
        return traced

    def model(self, model, sources, parent, inline=False):
        """Flatten one model fed by `sources`; the `Ref`s of its outputs.

        `inline`: `model` is the trace of a layer of `parent`, whose calls
        then belong to `parent`.
        """
        if isinstance(model, keras.Sequential):
            ref = sources[0] if sources else Ref(f"{model.name}:input")
            # Output specs cost a shape inference per layer: only worked out where a trace needs them.
            spec = any(trace_module.should_trace(layer) for layer in model.layers)
            for layer in model.layers:
                (ref,) = self.call(layer, (ref,), {}, [ref], parent=model, single=True, spec=spec)
            return [ref]
        behind = {id(tensor): source for tensor, source in zip(model.inputs, sources)}

        def ref_of(value):
            if isinstance(value, keras.KerasTensor):
                if id(value) not in behind:  # an input the caller did not feed
                    behind[id(value)] = Ref(value.name, value)
                return behind[id(value)]
            return value

        # A traced layer's calls belong to the model that holds the layer: they are inlined there.
        holder = parent if inline else model
        for operation, (call_args, call_kwargs), inputs, outputs in internals.calls_of(model):
            if inline:  # the mode the trace was made in: a call in a graph runs in its caller's mode
                call_kwargs = {key: value for key, value in call_kwargs.items() if key != "training"}
            results = self.call(
                operation,
                keras.tree.map_structure(ref_of, call_args),
                keras.tree.map_structure(ref_of, call_kwargs),
                [ref_of(tensor) for tensor in inputs],
                parent=holder,
                outputs=outputs,
            )
            for index, tensor in enumerate(outputs):
                behind[id(tensor)] = results[min(index, len(results) - 1)]
        return [ref_of(tensor) for tensor in keras.tree.flatten(model.outputs)]


def _output_spec(operation, args, kwargs):
    """The spec of what `operation` returns on these arguments, or `None` if unknown."""
    if any(isinstance(value, Ref) and value.spec is None for value in keras.tree.flatten((args, kwargs))):
        return None
    specs = keras.tree.map_structure(lambda value: value.spec if isinstance(value, Ref) else value, (args, kwargs))
    try:
        spec = operation.compute_output_spec(*specs[0], **specs[1])
    except Exception:  # a layer that cannot say: unknown
        return None
    return spec if isinstance(spec, keras.KerasTensor) else None
