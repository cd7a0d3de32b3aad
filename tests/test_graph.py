"""The one graph walker: Sequential, functional, nested, ops, shared layers."""


import keras
from keras import layers

import bnseq
from bnseq import internals
from bnseq.reading import graph


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


def test_subclassed_model_is_traced_into_its_layers():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    model = keras.Sequential([keras.Input((3,)), layers.Dense(3, name="d"), net])
    g = graph.walk(model)
    assert g.layers == [model.layers[0], net.dense]
    assert g.sole_producer(net.dense) is model.layers[0]


def test_subclassed_layer_that_does_not_trace_is_one_leaf():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x) + keras.ops.ones((2,)) * 0.0  # a tensor made outside the graph

    net = Net()
    model = keras.Sequential([keras.Input((3,)), layers.Dense(3, name="d"), net])
    g = graph.walk(model)
    assert g.layers == [model.layers[0], net]
    assert g.sole_producer(net) is model.layers[0]
    assert g.opaque[id(net)].startswith("its call() passes a tensor computed outside the graph")


def test_keras_graph_state_the_walker_reads():
    """Fails loudly if Keras changes the private graph state `internals.calls_of` reads."""
    inputs = keras.Input((3,))
    dense = layers.Dense(2, name="d")
    model = keras.Model(inputs, dense(inputs))
    assert isinstance(model._nodes_by_depth, dict)
    nodes = [node for nodes in model._nodes_by_depth.values() for node in nodes]
    (call,) = [node for node in nodes if not node.is_input]
    assert call.operation is dense
    assert [id(t) for t in call.input_tensors] == [id(inputs)]
    assert [id(t) for t in call.arguments.args] == [id(inputs)] and call.arguments.kwargs == {}
    assert [id(t) for t in keras.tree.flatten(call.outputs)] == [id(model.outputs[0])]
    assert [each.name for each in internals.inner_layers(layers.Dense(2, activation=layers.ReLU(name="r")))] == ["r"]


def test_functional_subclass_is_read_through():
    """A class built from inputs and outputs (as keras-hub backbones are) is functional."""

    class Backbone(keras.Model):
        def __init__(self, units=3, **kwargs):
            inputs = keras.Input((4,))
            outputs = layers.BatchNormalization(name="bn")(layers.Dense(units, name="d")(inputs))
            super().__init__(inputs, outputs, **kwargs)
            self.units = units

        def get_config(self):
            return {"units": self.units, "name": self.name}

    model = Backbone()
    assert internals.is_functional(model)
    g = graph.walk(model)
    assert names(g.layers) == ["d", "bn"]
    assert g.sole_producer(model.get_layer("bn")) is model.get_layer("d")


def test_custom_layer_without_get_config_does_not_hide_the_graph():
    class Scale(layers.Layer):
        def __init__(self, factor):
            super().__init__(name="scale")
            self.factor = factor  # an object get_config cannot serialize

        def call(self, x):
            return x * 2.0

    inputs = keras.Input((3,))
    x = Scale(object())(layers.Dense(3, name="d")(inputs))
    model = keras.Model(inputs, layers.BatchNormalization(name="bn")(x))
    g = graph.walk(model)
    assert names(g.layers) == ["d", "scale", "bn"]
    assert names(g.producers(model.get_layer("bn"))) == ["scale"]


def test_flatten_gives_each_call_of_a_nested_model_its_own_tensors():
    tower = keras.Sequential([keras.Input((3,)), layers.Dense(2, name="t")], name="tower")
    left, right = keras.Input((3,), name="left"), keras.Input((3,), name="right")
    joined = layers.Concatenate(name="cat")([tower(left), tower(right)])
    model = keras.Model([left, right], joined)
    flat = graph.flatten(model)
    assert [call.operation.name for call in flat.calls] == ["t", "t", "cat"]
    first, second, cat = flat.calls
    assert first.inputs == (flat.inputs[0],) and second.inputs == (flat.inputs[1],)
    assert first.outputs != second.outputs
    (pair,) = cat.args  # the list passed to Concatenate, with a Ref for each tensor
    assert pair == [first.outputs[0], second.outputs[0]]
    assert flat.outputs == [cat.outputs[0]]
    assert cat.parent is model and first.parent is tower


def test_flatten_a_subclassed_model_is_one_call_on_its_whole_input():
    class Net(keras.Model):
        def call(self, x):
            return x

    net = Net()
    flat = graph.flatten(net)
    (call,) = flat.calls
    assert call.operation is net and call.args == (flat.inputs[0],)
