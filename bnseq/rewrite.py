"""Layer surgery: split one linear layer into its normalized unit.

`split` turns `Dense(100, activation="relu")` into the unit
`Dense(100, use_bias=False)`, `BatchNormalization(axis=-1)`, `Activation("relu")`
in place, keeping the user's layer object, and returns what it needs to undo
the change if the model that receives the unit cannot take it.
"""

import dataclasses

import keras
from keras import layers

from bnseq import notices
from bnseq import rules


@dataclasses.dataclass
class Unit:
    """The layers one linear layer became, and how to put it back.

    Attributes:
        layers: list of Layer. The linear layer, its BatchNormalization and,
            unless the activation was the identity, its activation layer.
        undo: callable. Restores the linear layer's `use_bias`, `activation`
            and `activity_regularizer` as they were before `split`.
    """

    layers: list
    undo: object


def check_splittable(layer, index=None):
    """Raise if `split(layer)` would lose something the user gave.

    Raises:
        ValueError: if the layer is not one of `rules.LINEAR_LAYERS`, already
            holds a bias variable, or has an activity regularizer that its
            activation layer would overwrite.
    """
    name = rules.describe(layer, index)
    if not rules.is_linear(layer):
        kinds = ", ".join(kind.__name__ for kind in rules.LINEAR_LAYERS)
        raise ValueError(
            f"{name} is not a layer bnseq can batch-normalize (it normalizes "
            f"{kinds} and their subclasses). Add it with batch_norm=False or "
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


def split(layer, options, taken_names, index=None, batch_norm_name=None):
    """Turn one linear layer into (bias-free linear, BatchNormalization, act).

    The layer keeps its identity: it is changed in place to `use_bias=False`
    and the identity activation. The new layers follow its dtype policy; the
    activity regularizer moves to the last layer of the unit, so it still sees
    the same output. Call `check_splittable` first.

    Args:
        layer: Layer. One of `rules.LINEAR_LAYERS`, not yet holding a bias.
        options: dict. Keyword arguments for the BatchNormalization.
        taken_names: set of str. Names the new layers must avoid.
        index: int, optional. The layer's position, for messages.
        batch_norm_name: str, optional. The BatchNormalization's name, when it
            takes the place of an existing one; derived from the layer's name
            otherwise.

    Returns:
        `Unit`.
    """
    _warn_about_bias_arguments(layer, index)
    activation = layer.activation
    taken = set(taken_names)

    batch_norm = layers.BatchNormalization(
        axis=rules.channel_axis(layer),
        dtype=layer.dtype_policy,
        name=batch_norm_name or unique_name(f"{layer.name}_bn", taken),
        **options,
    )
    unit = [layer, batch_norm]
    if isinstance(activation, keras.Layer):
        unit.append(activation)
    elif not rules.is_identity(activation):
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

    return Unit(layers=unit, undo=undo)


def fresh_copy(layer):
    """A new, unbuilt layer (or operation) with the same configuration."""
    return layer.__class__.from_config(layer.get_config())


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
    """Replace `layer.activation`, also when the old one is a Layer.

    A Layer assigned as an attribute is tracked by Keras as a sublayer and, on
    the PyTorch backend, registered as a child `torch.nn.Module`; torch then
    refuses to assign a plain function over it. So the old Layer is deleted
    and untracked first. `Layer._tracker` is private Keras API with no public
    equivalent (checked on Keras 3.14 and 3.15): without the untrack, the
    activation layer would stay a sublayer of the linear layer after moving
    out of it.
    """
    old = layer.activation
    if isinstance(old, keras.Layer):
        del layer.activation
        layer._tracker.untrack(old)
    if isinstance(activation, keras.Layer):
        locked = layer._tracker.locked
        layer._tracker.unlock()
        try:
            layer.activation = activation
        finally:
            if locked:
                layer._tracker.lock()
    else:
        layer.activation = activation


def _warn_about_bias_arguments(layer, index):
    """Warn about bias settings the user made that no longer apply."""
    ignored = []
    if layer.bias_regularizer is not None:
        ignored.append("bias_regularizer")
    if layer.bias_constraint is not None:
        ignored.append("bias_constraint")
    if not isinstance(layer.bias_initializer, keras.initializers.Zeros):
        ignored.append("bias_initializer")
    if ignored and layer.use_bias:
        notices.warn(
            f"{rules.describe(layer, index)} sets {', '.join(ignored)}, but "
            "bnseq removes its bias (the BatchNormalization after it has its "
            "own offset, `beta`), so these settings no longer apply. Remove "
            "them, or add the layer with batch_norm=False to keep its bias."
        )
