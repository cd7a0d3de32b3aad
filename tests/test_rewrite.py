"""`bnseq.changing.rewrite` (the one rewrite engine) and `naming` (unique names in an inlined model)."""

import keras
import numpy as np
import pytest
from keras import layers

from bnseq.changing import naming
from bnseq.changing import rewrite
from bnseq.reading import graph


def test_split_keeps_the_layer_and_undo_puts_it_back():
    dense = layers.Dense(3, activation="relu", activity_regularizer="l2", name="d")
    unit = rewrite.split(dense, {"momentum": 0.9}, taken_names={"d", "d_bn"})
    first, bn, activation = unit.layers
    assert first is dense and not dense.use_bias and dense.activation is keras.activations.linear
    assert bn.name == "d_bn_1" and bn.momentum == 0.9 and bn.axis == -1
    assert activation.name == "d_relu" and activation.activity_regularizer is not None  # moved to the end
    assert dense.activity_regularizer is None
    unit.undo()
    assert dense.use_bias and dense.activation is keras.activations.relu and dense.activity_regularizer is not None


def test_split_refuses_what_it_would_lose():
    with pytest.raises(ValueError, match=r"ReLU 're' \(layer 2\) is not a layer bnseq can batch-normalize"):
        rewrite.check_splittable(layers.ReLU(name="re"), 2)
    built = layers.Dense(2, name="b")
    built.build((None, 3))
    with pytest.raises(ValueError, match="already built and its bias variable holds weights"):
        rewrite.check_splittable(built)


def test_unique_name():
    taken = {"a", "a_1"}
    assert rewrite.unique_name("a", taken) == "a_2" and "a_2" in taken
    assert rewrite.unique_name("b", taken) == "b"


def functional():
    inputs = keras.Input((4,), name="x")
    hidden = layers.Dense(3, name="d")(inputs)
    outputs = layers.Dense(2, name="out")(layers.ReLU(name="relu")(hidden))
    return keras.Model(inputs, outputs)


def test_apply_replaces_drops_and_keeps_every_other_layer_as_the_same_object():
    model = functional()
    d, relu, out = (model.get_layer(name) for name in ("d", "relu", "out"))
    replacement = [layers.Dense(3, name="d2"), layers.Activation("tanh", name="t")]
    plan = rewrite.Plan("test", sequential=None, replace={id(d): replacement}, drop={id(relu)})
    rebuilt = rewrite.apply(model, plan)
    assert [layer.name for layer in rebuilt.layers] == ["x", "d2", "t", "out"]
    assert rebuilt.get_layer("out") is out  # carried over, weights shared
    assert model.get_layer("d") is d and len(model.layers) == 4  # the original is as it was


def test_apply_with_layers_on_the_inputs_rebuilds_one_functional_model():
    model = functional()
    flat = graph.flatten(model)
    scale = layers.Rescaling(2.0, name="twice")
    plan = rewrite.Plan("test", sequential=None, inputs={flat.inputs[0]: [scale]})
    rebuilt = rewrite.apply(model, plan, flat)
    assert [layer.name for layer in rebuilt.layers] == ["x", "twice", "d", "relu", "out"]
    assert rebuilt.inputs[0].name == "x"  # the model's own input, the new layer after it
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(rebuilt.predict(x, verbose=0), model.predict(2 * x, verbose=0), rtol=1e-6)


def test_names_keeps_the_first_and_names_the_others_after_their_blocks():
    model = functional()
    names = naming.Names(model)
    first, mine, again = layers.Dense(1, name="conv"), layers.Dense(1, name="conv"), model.get_layer("d")
    assert names.unique(first, ("block_1",)) is first and first.name == "conv"
    assert names.unique(mine, ("block_2",)) is mine and mine.name == "block_2_conv"  # made here: renamed
    assert names.unique(again, ()) is again and again.name == "d"
    clash = layers.Dense(1, name="d")
    assert names.unique(clash, ("block_3",)).name == "block_3_d"
