"""The backend guards of a fold: where folding would meet a Keras or TensorFlow bug, decided once per process.

`bias_lands_on_the_wrong_axis` (Keras's bias-add layout guess on the
TensorFlow backend, `probes.bias_add_is_sound`) and `fuses_wrongly`
(oneDNN's conv + bias + add + LeakyReLU fusion, `probes.leaky_relu_fusion_is_sound`):
`fold_plan`, `fold_through` and `branches` keep a BatchNormalization, or a
sum of branches, where its fold would create either pattern.
"""

import keras

from bnseq import kinds
from bnseq import probes

FUSION_REASON = (
    "folding would give {layer} a bias followed by an add and a LeakyReLU, which TensorFlow with oneDNN "
    "fuses into one kernel that ignores the slope under predict (probes.leaky_relu_fusion_is_sound); kept "
    "so that predict stays right"
)


def fuses_wrongly(graph, layer, owner):
    """Whether a folded `layer`, with a bias, taking the place of `owner`'s output, would meet the bad fusion."""
    if isinstance(layer, keras.layers.Dense) or probes.leaky_relu_fusion_is_sound():
        return False
    return any(
        _is_add(consumer) and any(is_leaky_relu(after) for after in graph.consumers(consumer))
        for consumer in graph.consumers(owner)
    )


def _is_add(operation):
    return isinstance(operation, keras.layers.Add) or type(operation).__name__ == "Add"  # the layer or keras.ops.add


def is_leaky_relu(operation):
    """Whether `operation` may compute a leaky ReLU, decided on what it computes, not how it was written.

    A LeakyReLU layer or op, a ReLU with a negative slope, and an `Activation`
    whose function, probed on -1 and 1, keeps 1 and lets -1 through scaled
    (`partial(leaky_relu, 0.05)`, `partial(relu, negative_slope=0.05)`, an
    ELU too: kept on the safe side). A `Lambda` or a layer that is not
    Keras's own may compute anything, so it counts as one.
    """
    if isinstance(operation, keras.layers.LeakyReLU) or type(operation).__name__ == "LeakyRelu":
        return True
    if isinstance(operation, keras.layers.ReLU):
        return bool(operation.negative_slope)
    if isinstance(operation, keras.layers.Lambda) or (
        isinstance(operation, keras.layers.Layer) and not kinds.is_keras_class(type(operation))
    ):
        return True
    if isinstance(operation, keras.layers.Activation):
        return _lets_negatives_through(operation.activation)
    return False


def _lets_negatives_through(function):
    try:
        values = keras.ops.convert_to_numpy(function(keras.ops.convert_to_tensor([-1.0, 1.0])))
    except Exception:  # an activation that cannot be probed alone: on the safe side
        return True
    return bool(abs(float(values[1]) - 1.0) < 1e-6 and float(values[0]) < 0.0)


def bias_lands_on_the_wrong_axis(layer, shape):
    """Whether `layer`'s bias would be added along the wrong axis.

    See `probes.bias_add_is_sound`: where the backend guesses the layout of a
    bias from the input's shape, a channels_first layer whose last spatial size
    equals its channel count gets its bias on the last axis in eager calls
    (`predict`'s compiled graph is right). The layer's own BatchNormalization
    is not affected, so folding would change outputs exactly then.
    """
    if kinds.channel_axis(layer) != 1:
        return False
    if shape is None:
        return True  # unknown: keep the BatchNormalization, to be safe
    # An unknown last size (Input((C, None, None))) may equal the channel count at run time.
    return (shape[-1] is None or shape[-1] == shape[1]) and not probes.bias_add_is_sound()
