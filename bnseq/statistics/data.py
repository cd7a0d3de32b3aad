"""Data as `predict` takes it: its batches, and a batch as a model's input tensors."""

import itertools
import os

import keras
import numpy as np

from bnseq import internals


def batches_of(data, batch_size, steps, model=None):
    """The batches of `x` in `data`, as a list (at most `steps` of them read, then computed on step by step).

    `data` is what `predict` takes, and also a Python list of batches. A list
    of arrays is the model's inputs (one per input, as `predict` reads it)
    when `model` takes that many inputs of those ranks, and a list of batches
    when each item fits the model's inputs instead.
    """
    check_batching(batch_size, steps)
    check_data(data)
    if isinstance(data, keras.utils.PyDataset):
        count = len(data) if steps is None else min(steps, len(data))
        return [_x_of(data[index]) for index in range(count)]
    if _is_arrays(data) and not _is_a_list_of_batches(data, model):
        return _array_batches(data, batch_size or 32, steps)
    if hasattr(data, "as_numpy_iterator"):  # a tf.data.Dataset
        data = data.as_numpy_iterator()
    # islice reads no further than `steps`: an endless generator is fine, as with predict(steps=).
    return [_x_of(batch) for batch in itertools.islice(data, steps)]


def check_data(data):
    """Refuse what is not data at all (nothing, a path, a string) with what to pass instead."""
    if data is None:
        raise ValueError(
            "recalibrate needs data: the model's inputs as predict takes them (an array, a list or dict of "
            "arrays, a tf.data.Dataset, a keras.utils.PyDataset or a generator of batches). Received: data=None"
        )
    if isinstance(data, (str, bytes, os.PathLike)):
        raise TypeError(
            f"recalibrate takes the data itself, not a path: load it first, e.g. `np.load({os.fspath(data)!r})` "
            f"(on the command line, `bnseq recalibrate --data FILE.npy`). Received: data={data!r}"
        )


def _is_a_list_of_batches(data, model):
    """Whether a list of arrays holds batches of `model`'s inputs, not one array per input.

    Told by the model's input count and ranks; `False` where the model's
    inputs are not known (then a list is the inputs, as for `predict`).
    """
    if not isinstance(data, list):
        return False
    try:
        inputs = list(model.inputs) if model is not None else None
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        return False

    def fits(item):  # one batch: as many arrays as the model has inputs, each of its input's rank
        item = _x_of(item)
        leaves = keras.tree.flatten(item) if isinstance(item, (list, tuple, dict)) else [item]
        return len(leaves) == len(inputs) and all(
            len(np.shape(leaf)) == len(tensor.shape) for leaf, tensor in zip(leaves, inputs)
        )

    if len(data) == len(inputs) and all(
        hasattr(each, "shape") and len(each.shape) == len(tensor.shape) for each, tensor in zip(data, inputs)
    ):
        return False  # one array per input, as predict reads a list
    return all(fits(item) for item in data)


def check_batching(batch_size, steps):
    """Raise unless `batch_size` and `steps` are each `None` or a positive int."""
    for name, value in (("batch_size", batch_size), ("steps", steps)):
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive int or None. Received: {name}={value!r}")


def _is_arrays(data):
    """An array, a tensor, or a list/tuple/dict of them: the model's whole input."""
    if isinstance(data, (list, tuple, dict)) and not data:
        return False
    leaves = keras.tree.flatten(data) if isinstance(data, (list, tuple, dict)) else [data]
    return all(hasattr(leaf, "shape") and hasattr(leaf, "__len__") for leaf in leaves)


def _array_batches(data, batch_size, steps=None):
    leaves = keras.tree.flatten(data)
    size = len(leaves[0])
    if steps is not None:
        size = min(size, steps * batch_size)
    return [
        keras.tree.map_structure(lambda array, start=start: np.asarray(array[start : start + batch_size]), data)
        for start in range(0, size, batch_size)
    ]


def _x_of(batch):
    """`x` of a batch given as `x`, `(x,)`, `(x, y)` or `(x, y, w)`."""
    if isinstance(batch, tuple) and 1 <= len(batch) <= 3:
        return batch[0]
    return batch


def _by_key(model, x):
    """A dict batch for a model built on a dict of inputs, as a list in the order of `model.inputs`.

    Matched by the model's own keys, or else by its input tensors' names, as
    Keras matches them; never by sorted order alone, which would take a
    misspelled key and swap inputs whose keys and names disagree.
    """
    keys = list(model.input)
    position = {id(tensor): index for index, tensor in enumerate(model.inputs)}
    if set(x) == set(keys):
        pairs = [(position[id(model.input[key])], x[key]) for key in keys]
    else:
        names = {model.input[key].name: key for key in keys}
        if set(x) != set(names):
            raise ValueError(
                f"{type(model).__name__} '{model.name}' takes a dict with the keys {sorted(keys)}; a batch of the "
                f"data has the keys {sorted(x)}. Received: missing {sorted(set(keys) - set(x))}, unexpected "
                f"{sorted(set(x) - set(keys))}"
            )
        pairs = [(position[id(model.input[names[name]])], x[name]) for name in names]
    return [value for _, value in sorted(pairs, key=lambda pair: pair[0])]


def model_inputs(model, x, flat=None):
    """A batch as the tensors of `flat.inputs`, as a functional model reads its inputs.

    As `keras.Model` does: a dict is matched by input names, arrays are
    converted to each input's dtype, and a missing or extra trailing axis of
    size 1 is added or dropped. A subclassed model takes the batch as it
    comes: whole, or as its leaves where it traced (`flat.traced`).
    """
    if not (isinstance(model, keras.Sequential) or internals.is_functional(model)):
        tensors = keras.tree.map_structure(keras.ops.convert_to_tensor, x)
        if flat is not None and flat.traced:
            leaves = keras.tree.flatten(tensors)
            if len(leaves) != len(flat.inputs):
                raise ValueError(
                    f"{type(model).__name__} '{model.name}' was built on {len(flat.inputs)} input tensor(s), "
                    f"but a batch of the data holds {len(leaves)}. Received: a batch of type {type(x).__name__}"
                )
            return leaves
        return [tensors]
    references = list(model.inputs)
    if isinstance(x, dict) and isinstance(model.input, dict):
        x = _by_key(model, x)
    if isinstance(x, dict) and not isinstance(model.input, dict):
        missing = [tensor.name for tensor in references if tensor.name not in x]
        if missing:
            raise ValueError(
                f"The data's dict has no entry for the input(s) {missing} of {type(model).__name__} "
                f"'{model.name}'. Received: keys={sorted(x)}"
            )
        values = [x[tensor.name] for tensor in references]
    elif len(references) == 1 and not isinstance(x, (list, tuple, dict)):
        values = [x]
    else:
        values = keras.tree.flatten(x)
    if len(values) != len(references):
        raise ValueError(
            f"{type(model).__name__} '{model.name}' takes {len(references)} input(s), but a batch of "
            f"the data holds {len(values)}. Received: a batch of type {type(x).__name__}"
        )
    converted = []
    for value, reference in zip(values, references):
        value = keras.ops.convert_to_tensor(value, dtype=reference.dtype)
        rank, expected = len(value.shape), len(reference.shape)
        if rank == expected - 1 and reference.shape[-1] == 1:
            value = keras.ops.expand_dims(value, -1)
        elif rank == expected + 1 and value.shape[-1] == 1:
            value = keras.ops.squeeze(value, -1)
        if len(value.shape) != expected or any(
            size is not None and got is not None and size != got
            for size, got in zip(reference.shape[1:], value.shape[1:])
        ):  # as Keras's own input check refuses it in predict
            raise ValueError(
                f"{type(model).__name__} '{model.name}' takes input '{reference.name}' of shape "
                f"{tuple(reference.shape)}; a batch of the data has shape {tuple(value.shape)}."
            )
        converted.append(value)
    return converted
