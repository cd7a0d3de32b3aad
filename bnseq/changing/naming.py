"""Unique layer names for one inlined functional model.

When the rewrite inlines traced blocks into one functional model, every layer
in it must have its own name, and blocks written with fixed inner names
(`Conv1D(..., name="conv")` in every instance) meet there. `Names` gives
each clashing layer a name of its own, never renaming a layer of the user's.
"""

import keras

from bnseq import internals
from bnseq import kinds
from bnseq import notices


class Names:
    """Unique layer names for one inlined functional model.

    Blocks written with fixed inner names (`Conv1D(..., name="conv")` in
    every instance) meet once inlined. The first layer keeps its name; a
    later one of the same name is named after the blocks it came from
    (`block_2_conv`). A layer bnseq made for the result is renamed itself; a
    layer of the user's (kept as the same object) is never renamed, but
    replaced by a copy of it under the new name (from its config, with its
    weights), where Keras can re-create it; where it cannot, the rebuild
    refuses (`refused`, `why`).
    """

    def __init__(self, model):
        self.theirs = {id(layer) for layer in internals.inner_layers(model)}
        self.taken = {}  # name -> id(layer)
        self.given = {}  # id(layer) -> the layer standing for it
        self.refused, self.why = set(), ""

    def unique(self, layer, scope):
        if not isinstance(layer, keras.Layer):
            return layer
        if id(layer) in self.given:
            return self.given[id(layer)]
        if self.taken.setdefault(layer.name, id(layer)) == id(layer):
            self.given[id(layer)] = layer
            return layer
        name = "_".join((*scope, layer.name)) if scope else layer.name
        base, count = name, 1
        while name in self.taken:
            name, count = f"{base}_{count}", count + 1
        stand_in = layer
        if id(layer) in self.theirs:
            stand_in, why = _renamed_copy(layer, name)
            if stand_in is None:
                self.refused.add(layer.name)
                self.why = f"{kinds.describe(layer)} cannot be copied under another name: {why}"
                return layer
        else:
            stand_in.name = name
        self.taken[name] = id(layer)
        self.given[id(layer)] = stand_in
        return stand_in


def _renamed_copy(layer, name):
    """`(a copy of layer named name, "")`, or `(None, why not)`."""
    if not kinds.is_keras_class(type(layer)):
        return None, "it is not one of Keras's own layers (a config may leave out what its __init__ takes)"
    if not layer.built or internals.inner_layers(layer):
        return None, "it holds layers of its own or is not built"
    try:
        copy = type(layer).from_config({**layer.get_config(), "name": name})
        copy.build_from_config(layer.get_build_config())
        copy.set_weights(layer.get_weights())
    except Exception as error:  # a layer that does not come back from its config
        return None, notices.first_line(error)
    return copy, ""
