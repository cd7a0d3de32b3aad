"""Where each BatchNormalization sits and how it is held: read from a model, nothing changed.

- `batch_norms_with_paths(model)`: every BatchNormalization once, with the
  names of the models and layers that hold it (nested models, subclassed
  blocks), outermost first.
- `holders_of(model)`: the chain of holders of every layer inside.
- `state(layer)`: how a BatchNormalization's own settings hold it
  (`trainable`, and the part a `bnseq.FrozenBatchNormalization` holds).
- `recorded_inference(model)`: the BatchNormalization layers that a
  functional model records as called with `training=False`, directly or
  through the model or layer that holds them: what `fit` overrides in
  Keras 3.0 to 3.15 (see `probes.recorded_training_is_overridden`).
"""

import keras

from bnseq import internals


def batch_norms_with_paths(model):
    """Every BatchNormalization in `model` once, with the names of what holds it: `[(layer, (names...)), ...]`."""
    found = {}

    def visit(layer, path):
        for child in internals.child_layers(layer):
            if id(child) in found:
                continue
            here = (*path, child.name)
            if isinstance(child, keras.layers.BatchNormalization):
                found[id(child)] = (child, here)
            else:
                visit(child, here)

    visit(model, (model.name,))
    return list(found.values())


def holders_of(model):
    """`id(layer)` -> the models and layers that hold it, outermost (`model`) first, for every layer inside."""
    holders = {}

    def visit(layer, chain):
        for child in internals.child_layers(layer):
            if id(child) not in holders:
                holders[id(child)] = chain
                visit(child, (*chain, child))

    visit(model, (model,))
    return holders


def part_held(layer):
    """`"statistics"` or `"affine"` for a `bnseq.FrozenBatchNormalization` (the part it holds), else `None`."""
    if getattr(type(layer), "holds_a_part", False):
        return layer.frozen
    return None


def state(layer):
    """How a BatchNormalization's own settings hold it.

    One of `"trains"`, `"frozen"`, `"statistics frozen"`, `"affine frozen"`.
    """
    if not layer.trainable:
        return "frozen"
    part = part_held(layer)
    return f"{part} frozen" if part else "trains"


def statistics_held(layer):
    """Whether a BatchNormalization's own settings hold its moving statistics."""
    return state(layer) in ("frozen", "statistics frozen")


def affine_held(layer):
    """Whether a BatchNormalization's own settings hold its gamma and beta."""
    return state(layer) in ("frozen", "affine frozen")


def recorded_inference(model):
    """`id(batch_norm)` -> `(by, direct)` for each BatchNormalization a graph records as called with `training=False`.

    `by` is the name of the call that recorded it (the BatchNormalization
    itself, or the model or layer holding it); `direct` says which: the two
    ways Keras may treat differently.
    """
    found = {}

    def visit(graph_model, under):
        if isinstance(graph_model, keras.Sequential):
            for layer in graph_model.layers:
                reach(layer, under)
            return
        if not internals.is_functional(graph_model):
            return
        for operation, (_, kwargs), _, _ in internals.calls_of(graph_model):
            here = under
            if here is None and kwargs.get("training") is False:
                here = (operation.name, isinstance(operation, keras.layers.BatchNormalization))
            reach(operation, here)

    def reach(operation, under):
        if isinstance(operation, keras.layers.BatchNormalization):
            if under is not None:
                found.setdefault(id(operation), under)
            return
        if isinstance(operation, keras.Sequential) or internals.is_functional(operation):
            visit(operation, under)
        elif under is not None and isinstance(operation, keras.Layer):
            for layer in internals.inner_layers(operation):
                if isinstance(layer, keras.layers.BatchNormalization):
                    found.setdefault(id(layer), under)

    visit(model, None)
    return found
