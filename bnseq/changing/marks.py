"""The list-form markers: `bnseq.with_batch_norm` and `bnseq.without_batch_norm`."""

import weakref

import keras

from bnseq import kinds
from bnseq.changing import rewrite
from bnseq.deciding import rules

# Layers marked by `with_batch_norm` / `without_batch_norm`, for the list form
# of the constructor. Weak keys: a mark never keeps a layer alive.
MARKS = weakref.WeakKeyDictionary()


def with_batch_norm(layer, **options):
    """Marks a linear layer to be normalized when a `bnseq.Sequential` adds it.

    For the list form of the constructor, where `add()`'s per-layer
    `batch_norm` argument cannot be given. The options are checked now and
    merged over the model's own when the layer is added.

    Args:
        layer: Layer. One of the linear layers bnseq normalizes.
        **options: `keras.layers.BatchNormalization` arguments other than
            `axis`.

    Returns:
        `layer`, marked.

    Raises:
        TypeError: if `layer` is not a Keras layer.
        ValueError: if it is not a linear layer, or an option is invalid.

    Examples:
        >>> model = bnseq.Sequential([
        ...     keras.Input((4,)),
        ...     bnseq.with_batch_norm(keras.layers.Dense(8, activation="relu"),
        ...                           momentum=0.9),
        ...     keras.layers.Dense(2),
        ... ])
        >>> [type(layer).__name__ for layer in model.layers]
        ['Dense', 'BatchNormalization', 'Activation', 'Dense']
        >>> model.layers[1].momentum
        0.9
    """
    _check_markable(layer, "with_batch_norm")
    rewrite.check_splittable(layer)
    MARKS[layer] = rules.check_batch_norm(
        options or True, owner=kinds.describe(layer)
    )
    return layer


def without_batch_norm(layer):
    """Marks a layer to be added unchanged by a `bnseq.Sequential`.

    Args:
        layer: Layer.

    Returns:
        `layer`, marked.

    Raises:
        TypeError: if `layer` is not a Keras layer.

    Examples:
        >>> model = bnseq.Sequential([
        ...     keras.Input((4,)),
        ...     keras.layers.Dense(8, activation="relu"),
        ...     bnseq.without_batch_norm(keras.layers.Dense(2, activation="softmax")),
        ... ], batch_norm=True)
        >>> [type(layer).__name__ for layer in model.layers]
        ['Dense', 'BatchNormalization', 'Activation', 'Dense']
    """
    _check_markable(layer, "without_batch_norm")
    MARKS[layer] = False
    return layer


def _check_markable(layer, function):
    if not isinstance(layer, keras.Layer):
        raise TypeError(
            f"`{function}` marks a Keras layer. Received: layer={layer!r} "
            f"(of type {type(layer).__name__})"
        )
