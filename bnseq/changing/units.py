"""The units of a `bnseq.Sequential`: its layer stack, and what bnseq keeps beside it.

Each `add()` puts one unit on the stack (a layer, or a linear layer with its
BatchNormalization and activation); `pop()` takes one back. This mixin holds
the bookkeeping: appending a unit or restoring the model exactly as it was,
the BatchNormalization layers bnseq inserted (which a user's may take the
place of), the activation layers a unit needs of its own. It works with
`keras.Sequential`'s private state (`_layers`, `_functional`,
`_maybe_rebuild`), as Keras's own `add`, `pop` and `from_config` do (checked
on Keras 3.14 and 3.15; tests/test_keras_compat.py fails loudly if it
changes).
"""

import dataclasses
import weakref

import keras

from bnseq import kinds
from bnseq import notices
from bnseq.changing import layers as layers_module
from bnseq.changing import rewrite


@dataclasses.dataclass(eq=False)
class State:
    """What bnseq keeps for a model outside Keras's attribute tracking.

    Kept in `STATE`, not on the model: as attributes, Keras would track the
    graph as a sublayer (on PyTorch, a child module) and `save_weights` would
    write it as a group of its own.

    Attributes:
        graph: the functional graph built last, for `build` to extend.
        traced: tuple of the layers that graph covers.
        pending: list of `(message or callable, category)` warnings of layers
            added but not yet warned about (see `_flush_warnings`).
        inserted: the BatchNormalization layers bnseq inserted, which a
            BatchNormalization added next may take the place of.
    """

    graph: object = None
    traced: tuple = ()
    pending: list = dataclasses.field(default_factory=list)
    inserted: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)

    def remember(self, model):
        self.graph = model._functional
        self.traced = tuple(model._layers) if self.graph is not None else ()


STATE = weakref.WeakKeyDictionary()


class Units:
    """The unit bookkeeping of `bnseq.Sequential` (a mixin over `keras.Sequential`)."""

    def _activation_for(self, layer, index):
        """The activation layer `layer`'s unit gets, when its own is already in the model.

        Plain Keras lets one activation Layer serve several layers (each calls
        it); here it becomes a layer of each unit, so each unit needs its own:
        a copy for a layer without weights, an error for one with weights
        (such as PReLU), which cannot be copied without unsharing them.
        """
        activation = layer.activation
        if not isinstance(activation, keras.Layer):
            return None
        owner = next((each for each in self._layers if each is activation), None)
        if owner is None:
            return None
        if activation.weights or isinstance(activation, keras.layers.PReLU):
            at = self.layers.index(activation)
            holder = self.layers[at - 2] if at >= 2 and kinds.is_linear(self.layers[at - 2]) else None
            where = f"the activation of {kinds.describe(holder)}" if holder is not None else "a layer"
            raise ValueError(
                f"{kinds.describe(layer, index)} has the activation layer "
                f"{kinds.describe(activation)}, which is already {where} in "
                f"'{self.name}'. It has weights, so bnseq "
                "cannot give each unit a copy without unsharing them. Give each "
                f"layer its own activation layer. Received: layer={layer!r}"
            )
        return activation.__class__.from_config(
            {**activation.get_config(), "name": rewrite.unique_name(activation.name, {e.name for e in self._layers})}
        )

    def _inserted_batch_norm(self):
        """The BatchNormalization bnseq inserted that a new one would take the place of.

        That of the last unit (`linear, BatchNormalization[, activation]`), or,
        when the last unit is an activation layer, that of the unit before it
        if that one has no activation of its own, as `batch_normalize` takes
        over `linear -> activation layer -> BatchNormalization`.
        """
        sizes, stack = self._unit_sizes, self.layers
        if not sizes:
            return None
        unit = stack[len(stack) - sizes[-1] :]
        if len(unit) == 1 and isinstance(unit[0], kinds.ACTIVATION_LAYERS) and len(sizes) > 1:
            unit = stack[len(stack) - sizes[-1] - sizes[-2] : len(stack) - sizes[-1]]
            if len(unit) != 2:
                return None
        if len(unit) >= 2 and unit[1] in STATE[self].inserted:
            return unit[1]
        return None

    def _take_over(self, batch_norm, rebuild, index):
        """Put the user's `batch_norm` in place of the one bnseq inserted.

        It keeps its options and name. On the wrong axis it is replaced by a
        new layer with its options and name on the right one, with a warning;
        built on the wrong axis (holding weights) it is refused.
        """
        inserted = self._inserted_batch_norm()
        linear = self._layers[self._layers.index(inserted) - 1]
        self._check_not_in_model(batch_norm, index)
        axis = kinds.channel_axis(linear)
        replacement, message = batch_norm, None
        if layers_module.is_auto(batch_norm):
            batch_norm.settle(axis)  # "auto": the axis of the layer it normalizes
        elif not kinds.same_axis(batch_norm.axis, axis, kinds.output_rank(linear)):
            if batch_norm.built:
                raise ValueError(
                    f"{kinds.describe(batch_norm, index)} is built on axis {batch_norm.axis}, "
                    f"but it takes the place of the normalization of {kinds.describe(linear)}, "
                    f"whose channels are on axis {axis}; bnseq will not drop its weights. Add a "
                    "new BatchNormalization, or add this one with batch_norm=False. "
                    f"Received: layer={batch_norm!r}"
                )
            replacement = rewrite.renormalized(batch_norm, axis)
            message = (
                f"{kinds.describe(batch_norm, index)} normalizes axis {batch_norm.axis}, but it "
                f"takes the place of the normalization of {kinds.describe(linear)}, whose "
                f"channels are on axis {axis}: bnseq uses a new BatchNormalization '"
                f"{batch_norm.name}' with its options on axis {axis}. Write "
                f"`BatchNormalization(axis={axis})` to say so."
            )
        names = {each.name for each in self._layers if each is not inserted}
        if replacement.name in names:
            raise ValueError(
                "All layers added to a Sequential model should have unique "
                f"names. Name '{replacement.name}' is already the name of a layer "
                "in this model. Update the `name` argument to pass a unique name."
            )
        snapshot, state = list(self._layers), (self._functional, self.built)
        self._layers[self._layers.index(inserted)] = replacement
        self._functional, self.built = None, False
        try:
            if rebuild:
                self._maybe_rebuild()
        except BaseException:
            self._layers = snapshot
            self._functional, self.built = state
            raise
        STATE[self].inserted.discard(inserted)
        if message:
            STATE[self].pending.append((message, notices.BatchNormPlacementWarning))

    def _is_normalized(self, layer):
        """Whether `layer` heads a unit that `add()` normalized."""
        start = 0
        for size in self._unit_sizes:
            if size > 1 and self.layers[start] is layer:
                return True
            start += size
        return False

    def _check_not_in_model(self, layer, index):
        if any(existing is layer for existing in self._layers):
            raise ValueError(
                f"{kinds.describe(layer, index)} is already in Sequential model "
                f"'{self.name}'. Normalizing it again would change the copy "
                "already in the model; add a new layer instead (e.g. "
                f"`{type(layer).__name__}.from_config(layer.get_config())`). "
                f"Received: layer={layer!r}"
            )

    def _append(self, layers, rebuild):
        """Add `layers` as one unit; on any error, restore the model."""
        snapshot = list(self._layers)
        state = (self._functional, self.built, len(self.layers))
        names = {each.name for each in self._layers}
        for layer in layers[1:]:
            if layer.name in names:
                raise ValueError(
                    "All layers added to a Sequential model should have unique "
                    f"names. Name '{layer.name}' is already the name of a layer "
                    "in this model. Update the `name` argument to pass a "
                    "unique name."
                )
        try:
            for layer in layers:
                super().add(layer, rebuild=False)
            if rebuild:
                self._maybe_rebuild()
        except BaseException:
            while len(self._layers) > len(snapshot):
                self._layers.pop()
            if any(now is not before for now, before in zip(self._layers, snapshot)):
                self._layers = snapshot
            self._functional, self.built, _ = state
            raise
        added = len(self.layers) - state[2]
        if added:
            self._unit_sizes = (*self._unit_sizes, added)

    def _restore_units(self, layers, unit_sizes):
        """Append layers as they are, grouped into units; no rebuild."""
        for layer in layers:
            super().add(layer, rebuild=False)
        count = len(self.layers)
        if unit_sizes is None or sum(unit_sizes) != count:
            unit_sizes = [1] * count
        self._unit_sizes = tuple(unit_sizes)


def serialize_options(options):
    if options is False:
        return False
    return {
        key: keras.saving.serialize_keras_object(value)
        for key, value in options.items()
    }


def deserialize_options(saved, custom_objects):
    if saved is False or saved is True:
        return saved
    return {
        key: (
            keras.saving.deserialize_keras_object(
                value, custom_objects=custom_objects
            )
            if isinstance(value, dict) and "class_name" in value
            else value
        )
        for key, value in saved.items()
    }
