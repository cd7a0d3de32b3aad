"""`bnseq.BatchNormalization`: a BatchNormalization that works out its own axis.

The third way to place batch normalization right, for the functional API and
any Sequential: keep it a layer of its own, and let it read what comes before
it. On its first call it takes the channel axis of the layer that produced its
input (the rule `bnseq.Sequential` uses everywhere), warns as `add()` warns
about a bias or a nonlinearity before it, and from then on is exactly a
`keras.layers.BatchNormalization` (its class becomes Keras's own), so a model
using it saves and loads where bnseq is not installed, and `lint`, `fold` and
`batch_normalize` treat it as the BatchNormalization it is.
"""

import keras
from keras import layers

from bnseq import notices
from bnseq import rules


class BatchNormalization(layers.BatchNormalization):
    """A `keras.layers.BatchNormalization` whose `axis` defaults to `"auto"`.

    With `axis="auto"`, the first call decides the axis:

    - on a Keras symbolic tensor (the functional API, or a layer of any
      Sequential), from the layer that produced it: a linear layer's channel
      axis (`1` after a channels_first convolution, `-1` otherwise); a layer
      with a `data_format` (pooling, upsampling, padding) by that format; a
      layer that keeps its input's shape (an activation, Dropout) by the layer
      before it; a rank-2 output (Flatten, Dense features) `-1`;
    - on a tensor no layer produced (a model input, a concrete array): `-1`
      for rank 2 or when `keras.config.image_data_format()` is
      `"channels_last"`; for higher ranks under `"channels_first"` there is no
      telling images from sequences, so it raises, asking for `axis=`.

    It then warns with `bnseq.BatchNormPlacementWarning`, with the messages of
    `bnseq.Sequential.add()`, when the producer adds a bias (`BN001`) or ends
    in a nonlinearity (`BN002`), and becomes a plain
    `keras.layers.BatchNormalization` with that integer axis: that is what a
    model saves. An explicit integer `axis` gives Keras's own layer at once.

    Args:
        axis: `"auto"` or int. The axis to normalize.
        **kwargs: the other `keras.layers.BatchNormalization` arguments.

    Example:

    >>> inputs = keras.Input((3, 8, 8))
    >>> x = keras.layers.Conv2D(4, 3, use_bias=False, data_format="channels_first")(inputs)
    >>> bn = bnseq.BatchNormalization()
    >>> y = bn(x)
    >>> bn.axis, type(bn) is keras.layers.BatchNormalization
    (1, True)
    """

    def __new__(cls, axis="auto", **kwargs):
        if axis != "auto":
            return layers.BatchNormalization(axis=axis, **kwargs)
        return super().__new__(cls, **kwargs)

    def __init__(self, axis="auto", **kwargs):
        super().__init__(axis=-1, **kwargs)  # provisional, until the first call

    def __call__(self, inputs, *args, **kwargs):
        if type(self) is BatchNormalization:
            producer = _producer(inputs)
            self.settle(_axis_after(producer, inputs))
            if producer is not None:
                for _, message in rules.placement_problems(producer, self):
                    notices.warn(message)
        return layers.BatchNormalization.__call__(self, inputs, *args, **kwargs)

    def settle(self, axis):
        """Fix the axis and become a plain `keras.layers.BatchNormalization`."""
        self.axis = int(axis)
        self.__class__ = layers.BatchNormalization


def is_auto(layer):
    """Whether `layer` is a `bnseq.BatchNormalization` still waiting for its axis."""
    return type(layer) is BatchNormalization


def _producer(tensor):
    """The layer that produced a Keras symbolic tensor, or `None`.

    `KerasTensor._keras_history` is private Keras API; no public one names a
    tensor's producer (checked on Keras 3.14 and 3.15).
    """
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    operation = history.operation
    if isinstance(operation, layers.InputLayer):
        return None
    return operation


def _axis_after(producer, tensor):
    """The channel axis of `tensor`, read from the layers that produced it."""
    rank = len(tensor.shape)
    for _ in range(16):  # through shape-keeping layers, to the one that decides
        if producer is None:
            break
        if rules.is_linear(producer) or isinstance(producer, layers.BatchNormalization):
            return rules.channel_axis(producer) if rules.is_linear(producer) else producer.axis
        if rank == 2:
            return -1
        data_format = getattr(producer, "data_format", None)
        if data_format in ("channels_first", "channels_last"):
            return 1 if data_format == "channels_first" else -1
        try:
            same_shape = tuple(producer.input.shape) == tuple(producer.output.shape)
        except (AttributeError, ValueError, TypeError):
            same_shape = False
        if not same_shape:
            break
        producer = _producer(producer.input)
    if rank <= 2 or keras.config.image_data_format() == "channels_last":
        return -1
    raise ValueError(
        f"bnseq.BatchNormalization cannot tell the channel axis of a rank-{rank} "
        "tensor that no linear, pooling or other data_format layer produced, "
        "while keras.config.image_data_format() is 'channels_first': it may be "
        "images (axis 1) or a sequence (axis -1). Pass `axis=` explicitly. "
        f"Received: input shape {tuple(tensor.shape)}"
    )
