"""Pure decisions about BatchNormalization: no model is built or changed here.

The checking of `batch_norm` options, and the placement rules (BN001-BN004)
that `bnseq.Sequential` warns about and `bnseq.lint` reports. What kind of
layer a layer is comes from `bnseq.kinds`.
"""

import difflib
import inspect
import math
import numbers

import keras
import numpy as np
from keras import layers

from bnseq import kinds

# Options bnseq decides itself and so refuses in `batch_norm`.
_DERIVED_OPTIONS = {
    "axis": "bnseq puts each BatchNormalization on the channel axis of the "
    "layer before it (-1 for Dense and channels_last, 1 for channels_first)",
}

BATCH_NORM_OPTIONS = tuple(
    name
    for name, parameter in inspect.signature(
        layers.BatchNormalization.__init__
    ).parameters.items()
    if name not in ("self", "axis")
    and parameter.kind is not inspect.Parameter.VAR_KEYWORD
)


def check_batch_norm(batch_norm, owner=None):
    """Validate a `batch_norm` setting and return it in canonical form.

    Args:
        batch_norm: bool or dict. `False`, `True`, or a dict of
            `keras.layers.BatchNormalization` keyword arguments other than
            `axis`.
        owner: str, optional. The layer or model the setting is for, as
            messages name it.

    Returns:
        `False`, or a dict of options (`{}` for `True`).

    Raises:
        TypeError: if `batch_norm` is neither a bool nor a dict.
        ValueError: if the dict has `axis`, an unknown key, or a value that
            `BatchNormalization` rejects.

    Examples:
        >>> check_batch_norm(True)
        {}
        >>> check_batch_norm({"momentum": 0.9})
        {'momentum': 0.9}
        >>> check_batch_norm({"axis": 1})
        Traceback (most recent call last):
        ...
        ValueError: `batch_norm` cannot set `axis`: bnseq puts each ...
    """
    if isinstance(batch_norm, (bool, np.bool_)):  # NumPy's booleans too, as Keras takes them
        return {} if batch_norm else False
    where = "`batch_norm`" + (f" for {owner}" if owner else "")
    received = f"Received: batch_norm={batch_norm!r}"
    if not isinstance(batch_norm, dict):
        raise TypeError(
            f"{where} must be True, False or a dict of "
            "keras.layers.BatchNormalization arguments, such as "
            f"{{'momentum': 0.9}}. {received} "
            f"(of type {type(batch_norm).__name__})"
        )
    options = dict(batch_norm)
    for key in options:
        if key in _DERIVED_OPTIONS:
            raise ValueError(
                f"{where} cannot set `{key}`: {_DERIVED_OPTIONS[key]}. "
                f"Remove it. {received}"
            )
        if key not in BATCH_NORM_OPTIONS:
            close = difflib.get_close_matches(str(key), BATCH_NORM_OPTIONS, 1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(
                f"{where} has an unknown BatchNormalization argument "
                f"`{key}`.{hint} Valid arguments: "
                f"{', '.join(BATCH_NORM_OPTIONS)}. {received}"
            )
    _check_values(options, where, received)
    return options


# What a user of each other backend gets instead of `synchronized=True` (tests/test_distributed.py).
_UNSYNCHRONIZED = {
    "jax": (
        "On JAX there is nothing to synchronize: under keras.distribution.DataParallel a batch is one "
        "array sharded over the devices, and its mean is computed across them. "
    ),
    "torch": (
        "Keras has no distribution API on PyTorch: under DistributedDataParallel each process normalizes "
        "its own batch; bnseq.recalibrate pools the statistics of a torch.distributed group. "
    ),
}


def _check_values(options, where, received):
    """Raise a ValueError for option values BatchNormalization rejects.

    Keras checks most values when a layer is constructed, so one is built as a
    probe. It checks neither the range of `momentum` and `epsilon` nor the
    type of the flags, which then fail (or train badly) much later, so those
    are checked here.
    """
    for key in ("center", "scale", "synchronized", "renorm"):
        if key in options:
            if not isinstance(options[key], (bool, np.bool_)):
                raise ValueError(f"{where}: `{key}` must be True or False. {received}")
            options[key] = bool(options[key])  # a NumPy bool is a bool to Keras users
    for key in ("momentum", "epsilon", "renorm_momentum"):
        value = options.get(key)
        if value is None and key == "renorm_momentum":
            continue
        if key in options and (
            isinstance(value, (bool, np.bool_))
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise ValueError(f"{where}: `{key}` must be a finite number. {received}")
    backend = keras.backend.backend()
    if options.get("synchronized") and backend != "tensorflow":
        raise ValueError(
            f"{where}: `synchronized=True` needs the TensorFlow backend, where Keras "
            "all-reduces the batch statistics across the replicas of a "
            f"tf.distribute strategy; this process runs the {backend} backend. "
            f"{_UNSYNCHRONIZED.get(backend, '')}"
            "Set KERAS_BACKEND=tensorflow before importing Keras, or leave "
            f"`synchronized` out. {received}"
        )
    try:
        probe = layers.BatchNormalization(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: keras.layers.BatchNormalization rejects these options "
            f"on the {keras.backend.backend()} backend: {error} {received}"
        ) from None
    if not 0.0 <= probe.momentum <= 1.0:
        raise ValueError(f"{where}: `momentum` must be between 0 and 1. {received}")
    if not probe.epsilon > 0.0:
        raise ValueError(f"{where}: `epsilon` must be greater than 0. {received}")


def placement_problems(producer, batch_norm_layer, *, shared=False):
    """What is wrong with a BatchNormalization fed by `producer`.

    The rules `bnseq.Sequential` warns about on `add()` and `bnseq.lint`
    reports, in one place:

    - `BN001`: the producer is a linear layer that adds a bias, which the
      normalization subtracts again (`BN(Wx + b) = BN(Wx)`), or would once it
      moves before the activation. Not when the producer's output also goes
      elsewhere (`shared`): there the bias is not wasted.
    - `BN002`: the producer ends in a nonlinearity; the normalization belongs
      between the linear layer and its activation.
    - `BN003`: the BatchNormalization's axis is not the producer's channel
      axis, so it normalizes the wrong features (and trains silently).
    - `BN004`: the producer is itself a BatchNormalization.

    Args:
        producer: Layer. The layer whose output the BatchNormalization takes.
        batch_norm_layer: `keras.layers.BatchNormalization`.
        shared: bool. Whether the producer's output has other users than
            this BatchNormalization (another layer, a model output).

    Returns:
        list of `(code, message)` tuples, empty when the placement is right.

    Examples:
        >>> dense = keras.layers.Dense(4)
        >>> [code for code, _ in placement_problems(
        ...     dense, keras.layers.BatchNormalization())]
        ['BN001']
    """
    problems = []
    if kinds.is_linear(producer) and producer.use_bias and not shared:
        wasted = _bias_size(producer)
        size = f"{wasted} parameters" if wasted is not None else "parameters"
        if kinds.is_identity(producer.activation):
            why = (
                f"adds a bias that {kinds.describe(batch_norm_layer)} subtracts again "
                f"({size} wasted)"
            )
        else:
            why = (
                f"adds a bias that is redundant once {kinds.describe(batch_norm_layer)} "
                "moves before the activation, where its `beta` does the bias's "
                f"job ({size} wasted)"
            )
        problems.append(
            (
                "BN001",
                f"{kinds.describe(producer)} {why}. Write "
                f"`{type(producer).__name__}(..., use_bias=False)`, "
                "or let bnseq.Sequential(batch_norm=True) do it.",
            )
        )
    if kinds.is_nonlinearity(producer):
        problems.append(
            (
                "BN002",
                f"{kinds.describe(batch_norm_layer)} comes after the nonlinearity "
                f"of {kinds.describe(producer)}; it belongs between the linear "
                "layer and its activation. Write the linear layer without "
                "activation, then BatchNormalization, then the activation "
                "as its own layer, or let bnseq.Sequential(batch_norm=True) "
                "do it.",
            )
        )
    if isinstance(producer, layers.BatchNormalization):
        problems.append(
            (
                "BN004",
                f"{kinds.describe(batch_norm_layer)} directly follows "
                f"{kinds.describe(producer)}, whose output is already normalized; "
                "the second one only adds parameters and computation. Keep one "
                "of them.",
            )
        )
    if kinds.is_linear(producer):
        expected = kinds.channel_axis(producer)
        rank = kinds.output_rank(producer)
        if not kinds.same_axis(batch_norm_layer.axis, expected, rank):
            problems.append(
                (
                    "BN003",
                    f"{kinds.describe(batch_norm_layer)} normalizes axis "
                    f"{batch_norm_layer.axis}, but the channels of "
                    f"{kinds.describe(producer)} "
                    f"({getattr(producer, 'data_format', 'features')}) are on "
                    f"axis {expected}. Write "
                    f"`BatchNormalization(axis={expected})`.",
                )
            )
    return problems


def _bias_size(layer):
    """How many parameters the bias of an unbuilt or built linear layer has."""
    bias = getattr(layer, "bias", None)
    if bias is not None:
        return int(bias.shape[0])
    for attribute in ("units", "filters"):
        value = getattr(layer, attribute, None)
        if isinstance(value, int):
            return value
    return None
