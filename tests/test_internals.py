"""`bnseq.internals`: each private Keras hook bnseq relies on, on the Keras installed.

Every hook reads or sets state no public API reaches; if a Keras release moves it, the hook's test
here fails by name, before anything built on it misbehaves.
"""

import keras
import numpy as np
from keras import layers

from bnseq import internals


class Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.Sequential([layers.Dense(2, name="deep")], name="inner")
        self.bn = layers.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return self.bn(self.inner(x), training=training)


def model():
    inputs = keras.Input((3,), name="x")
    hidden = layers.Dense(4, name="first")(inputs)
    return keras.Model(inputs, layers.Dense(2, name="second")(layers.ReLU(name="relu")(hidden)))


def test_is_functional_and_calls_in_order():
    functional = model()
    assert internals.is_functional(functional)
    assert not internals.is_functional(keras.Sequential([keras.Input((3,)), layers.Dense(2)]))
    assert not internals.is_functional(Block())
    calls = list(internals.calls_of(functional))
    assert [operation.name for operation, *_ in calls] == ["first", "relu", "second"]
    operation, (args, kwargs), inputs, outputs = calls[1]
    assert args[0] is inputs[0] and kwargs == {} and outputs[0].shape == (None, 4)


def test_layers_inside_a_layer():
    block = Block()
    block.build((None, 3))
    assert [layer.name for layer in internals.child_layers(block)] == ["inner", "bn"]
    assert [layer.name for layer in internals.inner_layers(block)] == ["inner", "deep", "bn"]


def test_history_of_a_symbolic_tensor():
    inputs = keras.Input((3,))
    dense = layers.Dense(2, name="d")
    outputs = dense(inputs)
    operation, node, index = internals.history_of(outputs)
    assert operation is dense and node is not None and index == 0
    assert internals.history_of(inputs) is None and internals.history_of(np.ones(2)) is None


def test_nodes_restored_after_symbolic_calls():
    dense = layers.Dense(2)
    dense(keras.Input((3,)))
    with internals.nodes_restored([dense]):
        dense(keras.Input((3,)))
        assert len(dense._inbound_nodes) == 2
    assert len(dense._inbound_nodes) == 1
    assert dense.output.shape == (None, 2)  # one node again: Keras answers `output`


def test_call_context_sets_the_training_inner_layers_take():
    dropout = layers.Dropout(0.99, seed=1)
    x = np.ones((1, 200), "float32")
    with internals.call_context(True):
        trained = keras.ops.convert_to_numpy(dropout(x))  # no training= of its own
    with internals.call_context(False):
        inferred = keras.ops.convert_to_numpy(dropout(x))
    assert np.count_nonzero(trained) < 50 and np.array_equal(inferred, x)


def test_masks_are_read_from_tensors():
    inputs = keras.Input((4,), dtype="int32")
    embedded = layers.Embedding(5, 2, mask_zero=True)(inputs)
    assert internals.carries_mask(embedded) and internals.keras_mask(embedded) is not None
    assert not internals.carries_mask(inputs) and not internals.carries_mask(None)


def test_set_tracked_moves_a_layer_out_of_the_tracking():
    dense = layers.Dense(2, activation=layers.ReLU(name="act"))
    assert [layer.name for layer in internals.child_layers(dense)] == ["act"]
    internals.set_tracked(dense, "activation", keras.activations.linear)
    assert internals.child_layers(dense) == [] and dense.activation is keras.activations.linear
    internals.set_tracked(dense, "activation", layers.ReLU(name="back"))
    assert [layer.name for layer in internals.child_layers(dense)] == ["back"]


def test_what_the_optimizer_and_the_compile_saw():
    functional = model()
    functional.compile(keras.optimizers.SGD(), "mse")
    assert internals.optimizer_built_with(functional.optimizer) is None  # not built before the first step
    functional.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    built = internals.optimizer_built_with(functional.optimizer)
    assert {id(v) for v in built} == {id(v) for v in functional.trainable_variables}
    state = internals.compiled_trainable_state(functional)
    if state is not None:  # Keras 3.15 keeps it; 3.14 does not
        assert state[id(functional.get_layer("first"))] is True
