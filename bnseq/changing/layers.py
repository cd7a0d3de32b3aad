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

from bnseq import internals
from bnseq import kinds
from bnseq import notices
from bnseq.deciding import rules
from bnseq.reading import layout


@keras.saving.register_keras_serializable(package="bnseq", name="BatchNormalization")
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

    Examples:
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
            self.settle(_axis_after(inputs))
            if producer is not None:
                for _, message in rules.placement_problems(producer, self):
                    notices.warn(message)
        return layers.BatchNormalization.__call__(self, inputs, *args, **kwargs)

    def get_config(self):
        """Keras's config, with `axis="auto"`: an unsettled layer comes back unsettled.

        That is what `from_config`, `clone_model`, `copy.deepcopy` and a
        `.keras` file of a model not built yet read. A settled layer is
        Keras's own class, with Keras's own config.
        """
        config = super().get_config()
        config["axis"] = "auto"
        return config

    def settle(self, axis):
        """Fix the axis and become a plain `keras.layers.BatchNormalization`."""
        self.axis = int(axis)
        self.__class__ = layers.BatchNormalization


def is_auto(layer):
    """Whether `layer` is a `bnseq.BatchNormalization` still waiting for its axis."""
    return type(layer) is BatchNormalization


def _producer(tensor):
    """The layer that produced a Keras symbolic tensor, or `None` (a model input, or not symbolic)."""
    history = internals.history_of(tensor)
    return None if history is None else history[0]


def _axis_after(tensor):
    """The channel axis of `tensor` by `layout.py`'s rule, as an index; raises where it is unknown."""
    if hasattr(tensor, "_keras_history"):
        axis = layout.axis_of_tensor(tensor)
    else:
        axis = layout.source_axis(tuple(tensor.shape))
    rank = len(tensor.shape)
    if axis is not None:
        return -1 if axis == rank - 1 else axis  # written as Keras writes the last axis

    raise ValueError(
        f"bnseq.BatchNormalization cannot tell the channel axis of its rank-{rank} input: {_cause(tensor)}, "
        "and it does not guess. Pass `axis=` explicitly (1 for channels_first images, -1 for channels last). "
        f"Received: input shape {tuple(tensor.shape)}"
    )


def _cause(tensor):
    """Why the channel axis of `tensor` is unknown, in words that fit what produced it."""
    history = internals.history_of(tensor) if hasattr(tensor, "_keras_history") else None
    if history is None:
        return (
            "it is a model input, and keras.config.image_data_format() is 'channels_first', where images and "
            "sequences look alike"
        )
    producer = history[0]
    name = kinds.describe(producer)
    if isinstance(producer, (keras.layers.Reshape, keras.layers.Permute)) or type(producer).__name__ in (
        layout.REARRANGING
    ):
        return f"it comes from {name}, which moves or merges axes"
    if isinstance(producer, keras.layers.Lambda) or not kinds.is_keras_class(type(producer)):
        return f"it comes from {name}, whose call() may move axes"
    return f"it comes from {name}, and the channel axes of what feeds that disagree or are unknown"
