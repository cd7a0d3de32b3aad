"""The one graph walker: Sequential, functional, nested, ops, shared layers."""

import re

import keras
import pytest
from keras import layers

import bnseq
from bnseq import graph


def names(items):
    return [item.name for item in items]


def test_sequential_is_a_chain():
    model = keras.Sequential(
        [keras.Input((3,)), layers.Dense(2, name="a"), layers.Dense(2, name="b")]
    )
    g = graph.walk(model)
    assert names(g.layers) == ["a", "b"]
    assert g.producers(model.layers[0]) == []  # fed by the model input
    assert g.sole_producer(model.layers[1]) is model.layers[0]
    assert g.outputs == [model.layers[1]]
    assert g.parents[id(model.layers[0])] is model


def test_unbuilt_sequential():
    model = bnseq.Sequential([layers.Dense(2, name="a"), layers.ReLU(name="r")])
    g = graph.walk(model)
    assert names(g.producers(model.layers[1])) == ["a"]


def test_functional_branch_merge_and_ops():
    inputs = keras.Input((4,), name="x")
    a = layers.Dense(3, name="a")
    b = layers.Dense(3, name="b")
    add = layers.Add(name="plus")
    bn = layers.BatchNormalization(name="bn")
    merged = add([a(inputs), b(inputs)])
    out = keras.ops.multiply(bn(merged), 2.0)
    model = keras.Model(inputs, [out, merged])
    g = graph.walk(model)
    assert names(g.layers)[:4] == ["a", "b", "plus", "bn"]
    assert names(g.producers(add)) == ["a", "b"]
    assert g.sole_producer(bn) is add
    assert names(g.consumers(add)) == ["bn"]
    # `plus` is also a model output, so `bn` is not its only user.
    assert not g.feeds_only(add, bn)
    (op,) = g.consumers(bn)
    assert not isinstance(op, keras.Layer)  # the keras.ops call is a leaf too
    assert g.outputs == [op, add]


def test_nested_models_are_read_through():
    inner = keras.Sequential(
        [keras.Input((3,)), layers.BatchNormalization(name="inner_bn"), layers.Dense(2, name="inner_d")],
        name="inner",
    )
    inputs = keras.Input((4,))
    dense = layers.Dense(3, name="outer_d")
    model = keras.Model(inputs, layers.ReLU(name="r")(inner(dense(inputs))))
    outer = keras.Sequential([keras.Input((4,)), model], name="outer")
    g = graph.walk(outer)
    assert names(g.layers) == ["outer_d", "inner_bn", "inner_d", "r"]
    assert g.sole_producer(inner.layers[0]) is dense  # across the boundary
    assert g.sole_producer(model.layers[-1]) is inner.layers[1]
    assert g.parents[id(inner.layers[0])] is inner
    assert g.parents[id(dense)] is model
    assert names(g.outputs) == ["r"]


def test_shared_layer_has_every_producer():
    inputs = keras.Input((3,))
    shared = layers.Dense(3, name="shared")
    first = layers.Dense(3, name="first")
    model = keras.Model(inputs, shared(first(shared(inputs))))
    g = graph.walk(model)
    assert names(g.layers) == ["shared", "first"]
    assert names(g.producers(shared)) == ["first"]
    assert names(g.consumers(shared)) == ["first"]


def test_subclassed_model_is_one_leaf():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    model = keras.Sequential([keras.Input((3,)), layers.Dense(3, name="d"), net])
    g = graph.walk(model)
    assert g.layers == [model.layers[0], net]
    assert g.sole_producer(net) is model.layers[0]


def test_as_model_errors(tmp_path):
    with pytest.raises(TypeError, match="Expected a keras.Model or the path of a .keras file. Received: 3 "):
        graph.as_model(3)
    with pytest.raises(FileNotFoundError, match="No such file: '.*missing.keras'"):
        graph.as_model(tmp_path / "missing.keras")
    with pytest.raises(IsADirectoryError, match="is a directory, not a .keras file"):
        graph.as_model(tmp_path)
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="is not a .keras file \\(a .keras file is a zip archive"):
        graph.as_model(text)


def test_inconsistent_config_is_reported():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers.Dense(2, name="d")(inputs), name="broken")
    config = model.get_config()
    history = config["layers"][1]["inbound_nodes"][0]["args"][0]["config"]["keras_history"]
    history[0] = "nowhere"  # refers to a layer call the model does not contain
    model.get_config = lambda: config
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Cannot order the layers of model 'broken': its config refers to layer "
            "calls it does not contain."
        ),
    ):
        graph.walk(model)
