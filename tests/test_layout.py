"""`bnseq.reading.layout`: which axis holds the channels, operation by operation and over a model."""

import keras
from keras import layers

from bnseq.reading import graph
from bnseq.reading import layout


def test_transfer_through_each_kind_of_operation():
    cf = layers.Conv2D(4, 3, data_format="channels_first")
    assert layout.transfer(cf, [(3, (None, 8, 8, 3))], (None, 4, 6, 6)) == 1
    assert layout.transfer(layers.Dense(4), [(2, (None, 5, 3))], (None, 5, 4)) == 2
    assert layout.transfer(layers.Dense(4), [(1, (None, 3))], (None, 4)) == 1  # rank 2: the features
    # Elementwise layers keep their input's axis; a merge keeps it where every input agrees.
    assert layout.transfer(layers.ReLU(), [(1, (None, 4, 6, 6))], (None, 4, 6, 6)) == 1
    assert layout.transfer(layers.Add(), [(1, (None, 4, 6)), (1, (None, 4, 6))], (None, 4, 6)) == 1
    assert layout.transfer(layers.Add(), [(1, (None, 4, 4)), (2, (None, 4, 4))], (None, 4, 4)) is None
    assert layout.transfer(layers.Concatenate(1), [(1, (None, 4, 6)), (1, (None, 2, 6))], (None, 6, 6)) == 1
    # Permute moves it; a Reshape keeps it where the channel axis keeps its size at an end.
    assert layout.transfer(layers.Permute((2, 1)), [(1, (None, 4, 6))], (None, 6, 4)) == 2
    assert layout.transfer(layers.Reshape((36, 4)), [(3, (None, 6, 6, 4))], (None, 36, 4)) == 2
    assert layout.transfer(layers.Reshape((4, 36)), [(3, (None, 6, 6, 4))], (None, 4, 36)) is None
    # What rearranges axes, and what bnseq cannot read, says nothing.
    assert layout.transfer(layers.Lambda(lambda x: x), [(1, (None, 4, 6))], (None, 4, 6)) is None
    assert layout.transfer(layers.ReLU(), [(1, (None, 4, 6))], None) is None


def test_source_axis_of_a_model_input():
    assert layout.source_axis((None, 3)) == 1
    assert layout.source_axis((None, 8, 8, 3)) == 3  # channels_last, Keras's default image format


def test_axes_over_a_model_and_back_from_a_tensor():
    inputs = keras.Input((3, 8, 8))
    x = layers.Conv2D(4, 3, data_format="channels_first", name="conv")(inputs)
    x = layers.ReLU(name="relu")(x)
    x = layers.Permute((2, 3, 1), name="permute")(x)  # channels last from here on
    model = keras.Model(inputs, layers.Dense(2, name="dense")(x))
    walked = graph.walk(model)
    axes = layout.axes_of_graph(walked)  # the channel axis of what each layer takes
    by_name = {layer.name: axes.get(id(layer)) for layer in walked.layers}
    # A model input is taken as channels_last (Keras's default image format); the rest follows.
    assert by_name == {"conv": 3, "relu": 1, "permute": 1, "dense": 3}
    assert layout.axis_of_tensor(x) == 3
