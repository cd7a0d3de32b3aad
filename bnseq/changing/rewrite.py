"""The one rewrite engine, and the layer surgery it and `Sequential.add` share.

`split` turns `Dense(100, activation="relu")` into the unit
`Dense(100, use_bias=False)`, `BatchNormalization(axis=-1)`, `Activation("relu")`
in place, keeping the user's layer object, and returns what it needs to undo
the change if the model that receives the unit cannot take it.

`apply(model, plan)` rebuilds a Sequential or functional model from a `Plan`
that says, per leaf layer, what takes its place (`replace`) or that it goes
(`drop`). `batch_normalize` and `fold` are plans; neither rebuilds models.
Every layer a plan does not name is carried over as the same object, never
re-created from its config: re-creating a `Lambda` needs Keras's unsafe mode
and a custom layer its registration, and would lose its weights. So the new
model shares those layers (and their weights) with the original, as two
functional models built on one layer do. Nested models are always rebuilt,
by the plan's `sequential` for Sequential ones and as plain functional models
otherwise, so that no bnseq class survives in a folded model. A model in which
any subclassed layer traced (`trace.py`), or a subclassed model that traced
itself, is rebuilt as one plain functional model with every trace inlined:
the classes of the traced layers (keras-hub blocks, say) are gone from the
result, which holds their sublayers and `keras.ops` calls.
"""

import dataclasses

import keras
from keras import layers

from bnseq import internals
from bnseq import kinds
from bnseq.changing import naming
from bnseq.deciding import rules
from bnseq.reading import graph


@dataclasses.dataclass
class Unit:
    """The layers one linear layer became, and how to put it back.

    Attributes:
        layers: list of Layer. The linear layer, its BatchNormalization and,
            unless the activation was the identity, its activation layer.
        undo: callable. Restores the linear layer's `use_bias`, `activation`
            and `activity_regularizer` as they were before `split`.
        warnings: list of str. What the caller should warn about once the
            unit is in place (bias settings that no longer apply).
    """

    layers: list
    undo: object
    warnings: list


def check_splittable(layer, index=None):
    """Raise if `split(layer)` would lose something the user gave.

    Raises:
        ValueError: if the layer is not one of `kinds.LINEAR_LAYERS`, already
            holds a bias variable, or has an activity regularizer that its
            activation layer would overwrite.
    """
    name = kinds.describe(layer, index)
    if not kinds.is_linear(layer):
        linear = ", ".join(kind.__name__ for kind in kinds.LINEAR_LAYERS)
        raise ValueError(
            f"{name} is not a layer bnseq can batch-normalize (it normalizes "
            f"{linear} and their subclasses). Add it with batch_norm=False or "
            f"without a batch_norm argument. Received: layer={layer!r}"
        )
    if layer.built and layer.use_bias and getattr(layer, "bias", None) is not None:
        raise ValueError(
            f"{name} is already built and its bias variable holds weights, "
            "which bnseq will not silently drop. Add a new, unbuilt layer "
            f"(e.g. `{type(layer).__name__}.from_config(layer.get_config())`), "
            "or add this one with batch_norm=False to keep it as it is. "
            f"Received: layer={layer!r}"
        )
    activation = layer.activation
    if (
        layer.activity_regularizer is not None
        and isinstance(activation, keras.Layer)
        and activation.activity_regularizer is not None
    ):
        raise ValueError(
            f"{name} and its activation layer '{activation.name}' both have "
            "an activity_regularizer; bnseq would have to move the first onto "
            "the second. Keep one of them. "
            f"Received: layer={layer!r}"
        )


def split(layer, options, taken_names, index=None, batch_norm_name=None, activation=None):
    """Turn one linear layer into (bias-free linear, BatchNormalization, act).

    The layer keeps its identity: it is changed in place to `use_bias=False`
    and the identity activation. The new layers follow its dtype policy; the
    activity regularizer moves to the last layer of the unit, so it still sees
    the same output. Call `check_splittable` first.

    Args:
        layer: Layer. One of `kinds.LINEAR_LAYERS`, not yet holding a bias.
        options: dict. Keyword arguments for the BatchNormalization.
        taken_names: set of str. Names the new layers must avoid.
        index: int, optional. The layer's position, for messages.
        batch_norm_name: str, optional. The BatchNormalization's name, when it
            takes the place of an existing one; derived from the layer's name
            otherwise.
        activation: Layer, optional. The activation layer of the unit, in
            place of the layer's own (a copy, when that one is already used).

    Returns:
        `Unit`.
    """
    messages = _ignored_bias_arguments(layer, index)
    activation, activation_layer = layer.activation, activation
    taken = set(taken_names)

    batch_norm = layers.BatchNormalization(
        axis=kinds.channel_axis(layer),
        dtype=layer.dtype_policy,
        name=batch_norm_name or unique_name(f"{layer.name}_bn", taken),
        **{key: _own_copy(value) for key, value in options.items()},
    )
    unit = [layer, batch_norm]
    if isinstance(activation_layer, keras.Layer):
        unit.append(activation_layer)
    elif isinstance(activation, keras.Layer):
        unit.append(activation)
    elif not kinds.is_identity(activation):
        unit.append(
            layers.Activation(
                activation,
                dtype=layer.dtype_policy,
                name=unique_name(f"{layer.name}_{_name_of(activation)}", taken),
            )
        )

    use_bias, activity_regularizer = layer.use_bias, layer.activity_regularizer
    last = unit[-1]
    last_activity_regularizer = last.activity_regularizer

    _set_activation(layer, keras.activations.linear)
    layer.use_bias = False
    if activity_regularizer is not None:
        last.activity_regularizer = activity_regularizer
        layer.activity_regularizer = None

    def undo():
        last.activity_regularizer = last_activity_regularizer
        layer.activity_regularizer = activity_regularizer
        layer.use_bias = use_bias
        _set_activation(layer, activation)

    return Unit(layers=unit, undo=undo, warnings=messages)


def fresh_copy(layer):
    """A new, unbuilt layer with the same configuration (a known linear class: see `kinds.why_not_copied`)."""
    return layer.__class__.from_config(layer.get_config())


def normalized_copy(layer, options, taken, batch_norm_name=None):
    """A new unit for `layer`, leaving `layer` itself alone.

    The copy of the linear layer gets `layer`'s kernels once both are built
    (call the returned `carry` then); its bias is not carried, as the unit has
    none.

    Returns:
        (`Unit`, carry: a callable).
    """
    copy = fresh_copy(layer)
    unit = split(copy, options, taken, batch_norm_name=batch_norm_name)
    taken.update(each.name for each in unit.layers)

    def carry():
        bias = getattr(layer, "bias", None) if layer.use_bias else None
        kernels = [variable for variable in layer.weights if variable is not bias]
        if [tuple(v.shape) for v in kernels] == [tuple(v.shape) for v in copy.weights]:
            for source, target in zip(kernels, copy.weights):
                # A copy of the values, not the variable: on JAX, assigning a variable shares its
                # buffer, and `predict` on one model donates it, deleting the other model's weights.
                target.assign(keras.ops.convert_to_numpy(source))

    return unit, carry


def _own_copy(value):
    """A Keras object (initializer, regularizer, constraint) copied for one layer.

    One `RandomNormal(1.0, 0.02)` given in `batch_norm` would otherwise give
    every BatchNormalization the same values: an unseeded Keras initializer
    draws the same numbers on every call. A copy made from its config draws
    its own (a seeded one still repeats, as the seed asks).
    """
    configurable = (keras.initializers.Initializer, keras.regularizers.Regularizer, keras.constraints.Constraint)
    if isinstance(value, configurable):
        return value.__class__.from_config(value.get_config())
    return value


def batch_norm_options(batch_norm_layer):
    """A BatchNormalization's own options (all but `axis`), as `batch_norm` takes them."""
    config = batch_norm_layer.get_config()
    return {key: config[key] for key in rules.BATCH_NORM_OPTIONS if key in config}


def renormalized(batch_norm_layer, axis):
    """A new BatchNormalization with `batch_norm_layer`'s options and name on `axis`."""
    return layers.BatchNormalization(
        axis=axis,
        name=batch_norm_layer.name,
        dtype=batch_norm_layer.dtype_policy,
        **batch_norm_options(batch_norm_layer),
    )


def unique_name(name, taken):
    """`name`, or `name_1`, `name_2`, ... whichever is not in `taken`.

    The chosen name is added to `taken`.
    """
    candidate, number = name, 0
    while candidate in taken:
        number += 1
        candidate = f"{name}_{number}"
    taken.add(candidate)
    return candidate


def _name_of(activation):
    name = getattr(activation, "__name__", "activation")
    return name if name.isidentifier() else "activation"


def _set_activation(layer, activation):
    """Replace `layer.activation`, also when the old one is a Layer (see `internals.set_tracked`)."""
    internals.set_tracked(layer, "activation", activation)


def _ignored_bias_arguments(layer, index):
    """Messages about bias settings the user made that no longer apply."""
    ignored = []
    if layer.bias_regularizer is not None:
        ignored.append("bias_regularizer")
    if layer.bias_constraint is not None:
        ignored.append("bias_constraint")
    if not isinstance(layer.bias_initializer, keras.initializers.Zeros):
        ignored.append("bias_initializer")
    if not (ignored and layer.use_bias):
        return []
    return [
        f"{kinds.describe(layer, index)} sets {', '.join(ignored)}, but "
        "bnseq removes its bias (the BatchNormalization after it has its "
        "own offset, `beta`), so these settings no longer apply. Remove "
        "them, or add the layer with batch_norm=False to keep its bias."
    ]


# The engine ------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What a rewrite does to a model's leaf layers.

    Every leaf layer not named in `replace` or `drop` is kept: the same object
    in the new model.

    Attributes:
        what: str. The public function the plan is for, as errors name it.
        replace: dict. `id(layer)` -> list of layers called one after the
            other in its place.
        drop: set. `id(layer)` of layers whose one input passes straight
            through.
        sequential: callable. `(model, input, layers, unit_sizes)` -> the new
            Sequential model for a Sequential `model`; `input` is a new
            `keras.Input` tensor, or `None` when the model has none.
        finish: list of callables, run once the new model is built (weights
            are set there).
        first_tensor: set. `id(layer)` of replaced layers whose replacement
            is called on the first tensor among their arguments alone (a sum
            of branches that all pass the same tensor through, replaced by
            one convolution of it).
        inputs: dict or None. `graph.Ref` of a model input -> the layers
            called on it, one after the other, before anything reads it. A
            plan with `inputs` always rebuilds one functional model.
    """

    what: str
    sequential: object
    replace: dict = dataclasses.field(default_factory=dict)
    drop: set = dataclasses.field(default_factory=set)
    finish: list = dataclasses.field(default_factory=list)
    first_tensor: set = dataclasses.field(default_factory=set)
    inputs: object = None


def apply(model, plan, flat=None):
    """Rebuild `model` as `plan` says; the original is not changed.

    Args:
        model: `keras.Model`.
        plan: `Plan`.
        flat: `graph.Flat`, optional. The model as read; when any of its
            subclassed layers (or the model itself) traced, the result is one
            functional model with the traces inlined (`_rebuild_flat`).

    Returns:
        A Sequential model (from `plan.sequential`) for a Sequential model; a
        plain functional `keras.Model` with the same inputs and outputs for
        a functional one, a functional subclass included, and for any model
        holding traced layers.

    Raises:
        TypeError: for a subclassed model that does not trace.
        ValueError: when the inlined model would hold two layers of one name.
    """
    if flat is not None and (flat.traced or plan.inputs is not None):
        result = _rebuild_flat(model, flat, plan)
    else:
        result = _rebuild(model, plan, flat)
    for step in plan.finish:
        step()
    return result


def _rebuild(model, plan, flat=None):
    if isinstance(model, keras.Sequential):
        return _rebuild_sequential(model, plan)
    if internals.is_functional(model):
        return _rebuild_functional(model, plan)
    reason = (flat.opaque.get(id(model)) if flat is not None else None) or "it holds no layer bnseq rewrites"
    raise TypeError(
        f"{plan.what} could not read {type(model).__name__} '{model.name}', a subclassed model: "
        f"{reason}. Rewrite its layers where it builds them, with "
        "bnseq.Sequential(batch_norm=True), or build it as a functional model."
    )


def _rebuild_flat(model, flat, plan):
    """One functional model that makes `flat`'s calls, as `plan` says.

    Every traced layer, nested model and the model itself are inlined: the
    result holds the leaf layers and `keras.ops` calls only, so it saves to
    `.keras` as any functional model does (Keras serializes `keras.ops`
    nodes) and loads where the classes of the traced layers are unknown.
    """
    values, inputs = {}, {}
    for ref in flat.inputs:
        spec = ref.spec
        inputs[ref] = keras.Input(batch_shape=spec.shape, dtype=spec.dtype, sparse=spec.sparse, name=ref.name)
        values[ref] = inputs[ref]
        for layer in (plan.inputs or {}).get(ref, ()):
            values[ref] = layer(values[ref])

    def value_of(item):
        return values[item] if isinstance(item, graph.Ref) else item

    def input_of(item):
        return inputs[item] if isinstance(item, graph.Ref) else item

    names = naming.Names(model)
    for call in flat.calls:
        operation = call.operation
        args = keras.tree.map_structure(value_of, call.args)
        kwargs = keras.tree.map_structure(value_of, call.kwargs)
        if id(operation) in plan.drop or _unsavable_identity(operation):
            values[call.outputs[0]] = args[0]
            continue
        chain = [names.unique(layer, call.scope) for layer in plan.replace.get(id(operation), [operation])]
        if id(operation) in plan.first_tensor:
            args, kwargs = (keras.tree.flatten(args)[0],), {}
        outputs = chain[0](*args, **kwargs)
        for following in chain[1:]:
            outputs = following(outputs)
        leaves = keras.tree.flatten(outputs)
        if len(leaves) == len(call.outputs):
            values.update(zip(call.outputs, leaves))
        else:
            values[call.outputs[0]] = outputs
    if names.refused:
        raise ValueError(
            f"{plan.what} inlines the traced layers of {type(model).__name__} '{model.name}' into one "
            f"functional model, where two layers would share the name(s) {sorted(names.refused)}, and "
            f"{names.why}. Give the layers inside your subclassed layers unique names (for example prefixed "
            "by the block's name)."
        )
    return keras.Model(
        keras.tree.map_structure(input_of, flat.input_structure),
        keras.tree.map_structure(value_of, flat.output_structure),
        name=model.name,
        trainable=model.trainable,
    )


def _unsavable_identity(operation):
    """Whether `operation` is an `Identity` layer that Keras cannot save.

    Keras 3.15's `Identity` has no `get_config` of its own, and the automatic
    one raises `NotImplementedError` when it was given a `DTypePolicy` object
    as `dtype`, as keras-hub's blocks do (HGNetV2, D-FINE). Inside a block
    that was never saved on its own; inlined, it would make the whole model
    unsavable. It computes nothing, so the rebuild passes its input through.
    """
    if type(operation) is not keras.layers.Identity:
        return False
    try:
        operation.get_config()
    except NotImplementedError:
        return True
    return False


def _rebuild_sequential(model, plan):
    new_layers, unit_sizes = [], []
    for layer in model.layers:
        if id(layer) in plan.drop:
            continue
        if isinstance(layer, keras.Model):
            unit = [_rebuild(layer, plan)]
        else:
            unit = plan.replace.get(id(layer), [layer])
        new_layers.extend(unit)
        unit_sizes.append(len(unit))
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # not built: no input yet
        inputs = None
    tensor = None
    if inputs:
        tensor = keras.Input(batch_shape=inputs[0].shape, dtype=inputs[0].dtype)
    return plan.sequential(model, tensor, new_layers, unit_sizes)


def _rebuild_functional(model, plan):
    chains = {}  # id(first layer of a replacement) -> the layers called in turn
    passed = set()  # id(layer) of dropped layers: their input goes through
    first_tensor = set()  # id(first layer of a replacement) called on the first tensor alone

    def clone_function(layer):
        if isinstance(layer, keras.Model):
            return _rebuild(layer, plan)
        if id(layer) in plan.drop:
            passed.add(id(layer))
            return layer
        chain = plan.replace.get(id(layer))
        if chain is None:
            return layer  # kept: the same object, never re-created
        chains[id(chain[0])] = chain
        if id(layer) in plan.first_tensor:
            first_tensor.add(id(chain[0]))
        return chain[0]

    def call_function(layer, *args, **kwargs):
        if id(layer) in passed:
            return args[0]
        if id(layer) in first_tensor:
            args, kwargs = (keras.tree.flatten(args)[0],), {}
        outputs = layer(*args, **kwargs)
        for following in chains.get(id(layer), [layer])[1:]:
            outputs = following(outputs)
        return outputs

    return keras.models.clone_model(
        model, clone_function=clone_function, call_function=call_function
    )
