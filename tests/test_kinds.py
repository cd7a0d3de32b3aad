"""`bnseq.kinds`: the vocabulary every part shares (which layers are linear, their channel axis, names)."""

import keras
import pytest
from keras import layers

from bnseq import internals
from bnseq import kinds
from bnseq.changing import quantized_layers


class MyDense(layers.Dense):
    pass


@pytest.mark.parametrize(
    "layer, linear, nonlinear",
    [
        (layers.Dense(2), True, False),
        (layers.Dense(2, activation="relu"), True, True),
        (layers.Conv2D(2, 3, activation="linear"), True, False),
        (layers.SeparableConv1D(2, 3), True, False),
        (layers.EinsumDense("ab,bc->ac", output_shape=2), False, False),  # no one channel axis
        (layers.LSTM(2), False, False),  # its activations are inside the time loop
        (layers.Activation("linear"), False, False),
        (layers.Activation("tanh"), False, True),
        (layers.LeakyReLU(), False, True),
        (layers.Softmax(), False, True),
        (layers.Add(), False, False),
    ],
)
def test_linear_and_nonlinear(layer, linear, nonlinear):
    assert kinds.is_linear(layer) is linear
    assert kinds.is_nonlinearity(layer) is nonlinear


def test_activations_written_as_operations_are_nonlinearities():
    x = keras.Input((3,))
    operations = [keras.ops.relu(x), keras.ops.silu(x), keras.activations.gelu(x), keras.ops.add(x, x)]
    found = [kinds.is_nonlinearity(internals.history_of(tensor)[0]) for tensor in operations]
    assert found == [True, True, True, False]


def test_channel_axis_rank_and_same_axis():
    assert kinds.channel_axis(layers.Conv2D(2, 3, data_format="channels_first")) == 1
    assert kinds.channel_axis(layers.Conv2D(2, 3)) == -1 and kinds.channel_axis(layers.Dense(2)) == -1
    assert kinds.output_rank(layers.Conv3D(2, 3)) == 5 and kinds.output_rank(layers.Dense(2)) is None
    assert kinds.same_axis(-1, 3, 4) and kinds.same_axis([1], 1, 4) and not kinds.same_axis([1, 2], 1, 4)
    assert not kinds.same_axis(1, -1, 4)
    assert kinds.same_axis(1, -1, None)  # unknown rank: no false alarm
    assert not kinds.same_axis(-2, -1, None)


def test_describe_and_keras_classes():
    dense = layers.Dense(2, name="d")
    assert kinds.describe(dense) == "Dense 'd'" and kinds.describe(dense, 3) == "Dense 'd' (layer 3)"
    assert kinds.describe(dense, "the list") == "Dense 'd' (the list)"
    assert kinds.is_keras_class(layers.Dense) and not kinds.is_keras_class(MyDense)
    assert kinds.keras_base(MyDense(2)) is layers.Dense


def test_why_not_copied():
    assert kinds.why_not_copied(layers.Dense(2)) is None
    assert "subclass of Dense" in kinds.why_not_copied(MyDense(2))
    quantized = layers.Dense(2)
    quantized.build((None, 3))
    quantized.quantize("int8")
    assert kinds.why_not_copied(quantized) == "it is quantized (int8)"
    lora = layers.Dense(2)
    lora.build((None, 3))
    lora.enable_lora(1)
    assert kinds.why_not_copied(lora) == "it has LoRA weights"


def test_quantize_aware_layers_are_read_whole():
    assert kinds.reads_as_leaf(quantized_layers.QuantizedLinear(layers.Dense(2)))
    assert kinds.reads_as_leaf(quantized_layers.ActivationQuantizer())
    assert not kinds.reads_as_leaf(layers.Dense(2)) and not kinds.reads_as_leaf(keras.Sequential())
