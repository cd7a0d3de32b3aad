"""The export check: a model's inputs and outputs as flat lists paired by name, and their differences.

The check pairs inputs and outputs by name, never by position: the model's
input tensors' names are the artifact's input names in every format, and its
outputs are `output_0`, `output_1`, ... (or the keys of a dict of outputs).
A runtime lists them in an order of its own (LiteRT's interpreter lists a
two-input model's inputs as `[b, a]`).
"""

import re

import keras
import numpy as np

from bnseq import internals
from bnseq import probes


def check_onnx_names(model, expected):
    clashes = sorted(set(expected) & set(input_names(model)))
    if clashes:
        raise ValueError(
            f"The model has an output and an input both named {clashes[0]!r}, which Keras's ONNX exporter "
            "(tf2onnx) cannot write ('graph input not exist'). Rename the output's key or the keras.Input."
        )


# What a TensorFlow signature (LiteRT, SavedModel) takes as an argument name.
_SIGNATURE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-]*$")


def with_signature_names(model, chosen):
    """`model`, or a model around it whose inputs have names a TensorFlow signature can hold.

    Keras's LiteRT and SavedModel exporters write a signature with one
    argument per input, named after it, and TensorFlow refuses names with
    `:` or a space ("non-unique argument names"): those inputs are renamed
    as the runtimes rewrite such characters (`image:0` becomes `image`,
    `image input` becomes `image_input`), and `matched_inputs` pairs them
    back. Returns `(model, {old: new})`.
    """
    if chosen not in ("litert", "tf_saved_model"):
        return model, {}
    renamed = {name: _mangled(name) for name in input_names(model) if not _SIGNATURE_NAME.match(name)}
    if not renamed:
        return model, {}
    taken = set(input_names(model))
    for old, new in renamed.items():
        if new in taken:
            raise ValueError(
                f"The model's input '{old}' cannot be a {chosen} signature argument, and its plain form '{new}' "
                "is another input's name. Rename the keras.Input."
            )
        taken.add(new)
    inputs = [
        keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=renamed.get(tensor.name, tensor.name))
        for tensor in model.inputs
    ]
    structure = keras.tree.pack_sequence_as(_input_structure(model), inputs)
    with internals.nodes_restored([model]):
        wrapper = keras.Model(structure, model(structure), name=model.name)
    return wrapper, renamed


def input_names(model):
    return [tensor.name for tensor in model.inputs]


def _input_structure(model):
    try:
        return model.input  # a Functional's own structure: a dict, a list or one tensor
    except AttributeError:  # a Sequential that was never called
        return model.inputs[0] if len(model.inputs) == 1 else list(model.inputs)


def call_input(model, flat):
    return keras.tree.pack_sequence_as(_input_structure(model), list(flat))


def flat_inputs(model, value, what):
    """`value` (array, list or dict) as a list in the order of `model.inputs`, cast and shape-checked."""
    tensors = model.inputs
    names = input_names(model)
    structure = _input_structure(model)
    if isinstance(value, dict) or hasattr(value, "files"):  # a dict, or NumPy's NpzFile
        keyed = {key: value[key] for key in (value.files if hasattr(value, "files") else value)}
        # A model built on a dict of inputs takes its own keys too (Keras warns when they differ from the names).
        aliases = {key: tensor.name for key, tensor in structure.items()} if isinstance(structure, dict) else {}
        by_name = {aliases.get(key, key): array for key, array in keyed.items()}
        if len(keyed) == 1 and len(names) == 1:
            by_name = {names[0]: next(iter(keyed.values()))}
        if set(by_name) != set(names):
            keys = sorted(aliases) or names
            raise ValueError(
                f"The {what} must have one array per model input, keyed by the input's name: "
                f"{', '.join(map(repr, keys))}. Received keys: {', '.join(map(repr, keyed))}"
            )
        arrays = [by_name[name] for name in names]
    elif isinstance(value, (list, tuple)):
        arrays = list(value)
    else:
        arrays = [value]
    if len(arrays) != len(tensors):
        raise ValueError(
            f"The model takes {len(tensors)} inputs ({', '.join(names)}); the {what} has {len(arrays)}. Pass a "
            "list in that order, or a dict keyed by those names."
        )
    flat = []
    for name, tensor, array in zip(names, tensors, arrays):
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        array = np.asarray(keras.ops.convert_to_numpy(array) if not isinstance(array, np.ndarray) else array)
        expected = tuple(tensor.shape)
        if array.ndim != len(expected) or any(
            size is not None and size != got for size, got in zip(expected[1:], array.shape[1:])
        ):
            shape = "(batch, " + ", ".join("?" if size is None else str(size) for size in expected[1:]) + ")"
            raise ValueError(
                f"The {what} for input '{name}' has shape {array.shape}; the model takes {shape}."
            )
        if len(array) == 0:
            raise ValueError(f"The {what} for input '{name}' is empty.")
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            rows = np.flatnonzero(~np.isfinite(array).reshape(len(array), -1).all(axis=1))
            raise ValueError(
                f"The {what} for input '{name}' holds NaN or infinity (in {len(rows)} of {len(array)} examples, "
                f"the first at index {rows[0]}), where no difference can be measured. Pass finite inputs: "
                f"e.g. drop those rows with `x[np.isfinite(x).reshape(len(x), -1).all(axis=1)]`."
            )
        flat.append(array.astype(dtype, copy=False))
    if len({len(array) for array in flat}) > 1:
        raise ValueError(
            f"The {what}'s arrays have different numbers of examples: "
            + ", ".join(f"{name} {len(array)}" for name, array in zip(names, flat))
        )
    return flat


def named(model, outputs):
    """The model's outputs as `{name: array}` in flatten order: a dict's keys, or `output_0`, `output_1`, ..."""
    if isinstance(outputs, dict):
        return {key: np.asarray(outputs[key]) for key in sorted(outputs)}
    return {f"output_{index}": np.asarray(each) for index, each in enumerate(keras.tree.flatten(outputs))}


def paired(expected, produced, chosen):
    """`produced` (a list of `(name, array)` in the runtime's order) keyed by the names in `expected`."""
    by_name = {re.sub(r":\d+$", "", name): array for name, array in produced}
    if set(expected) <= set(by_name):
        return {name: by_name[name] for name in expected}
    if len(produced) == len(expected) and (len(expected) == 1 or chosen == "onnx"):
        # One output; or tf2onnx's names (Identity, Identity_1, ...), listed in the model's output order.
        return {name: array for name, (_, array) in zip(expected, produced)}
    raise ValueError(
        f"The {chosen} artifact's outputs ({', '.join(name for name, _ in produced)}) cannot be matched with "
        f"the model's ({', '.join(expected)})."
    )


def matched_inputs(names, available, chosen):
    """`{model input name: runtime input name}`.

    By the name itself first (ONNX keeps `image:0` as it is), then with a
    runtime's `:0` suffix dropped, then as runtimes rewrite characters they
    do not keep (a SavedModel signature makes `x-1` into `x_1`: any character
    other than a letter, a digit or `_` becomes `_`).
    """
    for key in (lambda name: name, _without_suffix, _mangled):
        table = {}
        for name in available:
            table.setdefault(key(name), []).append(name)
        if all(len(table.get(key(name), ())) == 1 for name in names):
            return {name: table[key(name)][0] for name in names}
    if len(names) == len(available) == 1:
        return {names[0]: available[0]}
    raise ValueError(
        f"The {chosen} artifact's inputs ({', '.join(available)}) cannot be matched with the model's "
        f"({', '.join(names)}) by name."
    )


def _without_suffix(name):
    return re.sub(r":\d+$", "", name)


def _mangled(name):
    return re.sub(r"[^A-Za-z0-9_]", "_", _without_suffix(name))


def difference(expected, actual):
    """`(largest absolute, relative)` difference of two `{name: array}` (see `probes.largest_difference`)."""
    names = list(expected)
    return probes.largest_difference([expected[name] for name in names], [actual[name] for name in names])


def weakness(expected):
    """Why a check on these outputs says little, or `None`."""
    arrays = [np.asarray(each, np.float64) for each in expected.values()]
    if all(not np.any(each) for each in arrays):
        return (
            "the model's outputs on the sample are all zero. Pass sample= with real inputs (on the command "
            "line --sample FILE.npy or .npz) for a check that can fail."
        )
    if all(len(each) > 1 and np.all(each == each[:1]) for each in arrays):
        return (
            "the model gives the same outputs for every example of the sample. Pass sample= with real inputs "
            "(on the command line --sample FILE.npy or .npz) for a check that can fail."
        )
    return None
