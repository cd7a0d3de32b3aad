"""`bnseq.batch_normalize`: rewrite any model into the normalized form."""

import keras

from bnseq import graph as graph_module
from bnseq import rewrite
from bnseq import rules
from bnseq.sequential import Sequential


def batch_normalize(model, batch_norm=True):
    """Returns a new model with batch normalization in the right place.

    Every linear layer (`Dense`, the convolutions and their transposed,
    depthwise and separable forms) becomes the unit bnseq writes: the layer
    without bias and with the identity activation, a BatchNormalization on its
    channel axis, then the activation. A BatchNormalization that already sits
    right after a linear layer (or after its activation layer) becomes that
    layer's normalization, moved before the activation, with its options and
    name kept, never a second one. Every other layer is copied as it is, and
    models nested inside the model are rewritten the same way.

    The result is a new architecture with freshly initialized weights, as from
    `keras.models.clone_model`: train it, or copy over the weights that still
    fit. The original model is not changed. `lint()` of the result is empty,
    and `batch_normalize` of the result gives the same structure again.

    Args:
        model: `keras.Model`. Sequential (from Keras or bnseq) or functional.
        batch_norm: bool or dict. `True`, or a dict of
            `keras.layers.BatchNormalization` arguments for the
            normalizations this adds (those already in the model keep theirs).

    Returns:
        A `bnseq.Sequential` with this `batch_norm` for a Sequential model; a
        functional model with the same inputs and outputs for a functional one.

    Raises:
        TypeError: if `model` is a subclassed model, which has no graph to
            rewrite, or `batch_norm` has the wrong type.
        ValueError: if `batch_norm` is `False` or has invalid options.

    Example:

    >>> inputs = keras.Input((8,))
    >>> x = keras.layers.Dense(16, activation="relu")(inputs)
    >>> x = keras.layers.BatchNormalization()(x)   # after the activation
    >>> model = keras.Model(inputs, keras.layers.Dense(1)(x))
    >>> fixed = bnseq.batch_normalize(model)
    >>> [type(layer).__name__ for layer in fixed.layers]
    ['InputLayer', 'Dense', 'BatchNormalization', 'Activation', 'Dense', \
'BatchNormalization']
    >>> bnseq.lint(fixed)
    []
    """
    options = rules.check_batch_norm(batch_norm)
    if options is False:
        raise ValueError(
            "batch_normalize(batch_norm=False) would change nothing. Pass True "
            "or a dict of BatchNormalization options. Received: batch_norm=False"
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            "batch_normalize expects a keras.Model. "
            f"Received: model={model!r} (of type {type(model).__name__})"
        )
    graph = graph_module.walk(model)
    plan = _Plan(graph, options)
    return plan.rewrite(model, batch_norm)


class _Plan:
    """What happens to each layer, decided once from the graph."""

    def __init__(self, graph, options):
        self.options = options
        self.taken = {layer.name for layer in graph.layers}
        # id(linear layer) -> (BatchNormalization options, name or None)
        self.normalize = {}
        # id(BatchNormalization) that a linear layer takes over
        self.absorbed = set()
        for layer in graph.layers:
            if not rules.is_linear(layer):
                continue
            existing = _existing_batch_norm(graph, layer)
            if existing is None:
                self.normalize[id(layer)] = (options, None)
            else:
                self.absorbed.add(id(existing))
                self.taken.discard(existing.name)
                self.normalize[id(layer)] = (_options_of(existing), existing.name)

    def rewrite(self, model, batch_norm):
        if isinstance(model, keras.Sequential):
            return self._sequential(model, batch_norm)
        if graph_module.functional_config(model) is None:
            raise TypeError(
                f"batch_normalize reads Sequential and functional models; "
                f"{type(model).__name__} '{model.name}' is a subclassed model, "
                "whose graph Keras cannot show. Rewrite its layers where it "
                "builds them, with bnseq.Sequential(batch_norm=True)."
            )
        return self._functional(model, batch_norm)

    def _sequential(self, model, batch_norm):
        result = Sequential(name=model.name, trainable=model.trainable, batch_norm=batch_norm)
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):  # not built: no input yet
            inputs = None
        if inputs:
            result.add(keras.Input(batch_shape=inputs[0].shape, dtype=inputs[0].dtype))
        for layer in model.layers:
            if id(layer) in self.absorbed:
                continue
            if isinstance(layer, keras.Model):
                result.add(self.rewrite(layer, batch_norm), rebuild=False, batch_norm=False)
            elif id(layer) in self.normalize:
                options, name = self.normalize[id(layer)]
                result._add_normalized(rewrite.fresh_copy(layer), options, False, None, name)
            else:
                result.add(rewrite.fresh_copy(layer), rebuild=False, batch_norm=False)
        if result.layers:
            result._maybe_rebuild()
        return result

    def _functional(self, model, batch_norm):
        units = {}  # id(clone) -> the layers a linear clone became
        skipped = set()  # id(clone) of absorbed BatchNormalization layers

        def clone_function(layer):
            if isinstance(layer, keras.Model):
                return self.rewrite(layer, batch_norm)
            clone = rewrite.fresh_copy(layer)
            if id(layer) in self.absorbed:
                skipped.add(id(clone))
            elif id(layer) in self.normalize:
                options, name = self.normalize[id(layer)]
                unit = rewrite.split(clone, options, self.taken, batch_norm_name=name)
                self.taken.update(each.name for each in unit.layers)
                units[id(clone)] = unit.layers
            return clone

        def call_function(layer, *args, **kwargs):
            if id(layer) in skipped:
                return args[0]
            outputs = layer(*args, **kwargs)
            for following in units.get(id(layer), [layer])[1:]:
                outputs = following(outputs)
            return outputs

        return keras.models.clone_model(
            model, clone_function=clone_function, call_function=call_function
        )


def _existing_batch_norm(graph, layer):
    """The BatchNormalization right after `layer` that can become its own.

    Either `layer -> BatchNormalization`, or, when the layer's own activation
    is the identity, `layer -> activation layer -> BatchNormalization`; each
    step the only user of the one before, all in the same model.
    """
    parent = graph.parents.get(id(layer))
    step = layer
    for _ in range(2):
        consumers = graph.consumers(step)
        if len(consumers) != 1 or not graph.feeds_only(step, consumers[0]):
            return None
        (following,) = consumers
        if graph.parents.get(id(following)) is not parent:
            return None
        if isinstance(following, keras.layers.BatchNormalization):
            return following
        if step is not layer or not isinstance(following, rules.ACTIVATION_LAYERS):
            return None
        if not rules.is_identity(layer.activation):
            return None
        step = following
    return None


def _options_of(batch_norm_layer):
    """A BatchNormalization's own options, as `batch_norm` takes them."""
    config = batch_norm_layer.get_config()
    return {key: config[key] for key in rules.BATCH_NORM_OPTIONS if key in config}
