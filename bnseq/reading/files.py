"""Models given as `.keras` paths: loaded the way Keras loads them, with its `safe_mode`."""

import os
import zipfile

import keras
import numpy as np

from bnseq import notices


def built_model(model_or_path, *, what, holds, strict=False, safe_mode=True):
    """`as_model`, for a function `what` that rebuilds a model from the `holds` of a built one.

    Raises:
        TypeError: if `model_or_path` is neither a model nor a path, or
            `strict` is not a bool.
        ValueError: if the model is not built (and what `as_model` raises).
    """
    if not isinstance(model_or_path, (keras.Model, str, os.PathLike)):
        raise TypeError(
            f"{what} expects a keras.Model or the path of a .keras file. "
            f"Received: model={model_or_path!r} (of type {type(model_or_path).__name__})"
        )
    if not isinstance(strict, (bool, np.bool_)):
        raise TypeError(f"`strict` must be True or False. Received: strict={strict!r}")
    model = as_model(model_or_path, safe_mode=safe_mode)
    if not model.built:
        raise ValueError(
            f"{type(model).__name__} '{model.name}' is not built, so it has no {holds} to {what}. "
            "Build it (call it on data, or start it with keras.Input) and train it first."
        )
    return model


def as_model(model_or_path, *, safe_mode=True):
    """A model given as itself or as the path of a `.keras` file.

    Args:
        model_or_path: `keras.Model`, or str or path-like of a `.keras` file.
        safe_mode: bool. Keras's own `safe_mode` for the file: `False` lets a
            file with `Lambda` layers (Python bytecode) load; only for files
            you trust.

    Raises:
        TypeError: for anything else.
        FileNotFoundError: if the path does not exist.
        IsADirectoryError: if the path is a directory.
        ValueError: if the file is not a model Keras can load; for a `Lambda`
            layer in safe mode, the message says how to load it.
    """
    if isinstance(model_or_path, keras.Model):
        return model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(
            "Expected a keras.Model or the path of a .keras file. "
            f"Received: {model_or_path!r} (of type {type(model_or_path).__name__})"
        )
    path = os.fspath(model_or_path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"'{path}' is a directory, not a .keras file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file: '{path}'")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"'{path}' is not a .keras file (a .keras file is a zip archive "
            "written by `model.save()`)."
        )
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as error:  # Keras raises many kinds for a bad archive
        if safe_mode and "safe_mode" in str(error):
            raise ValueError(
                f"'{path}' holds a Lambda layer, whose Python code Keras loads only "
                "outside safe mode. If you trust the file, pass safe_mode=False "
                "(on the command line: --unsafe)."
            ) from error
        raise ValueError(f"Keras cannot load '{path}': {notices.first_line(error)}") from error
