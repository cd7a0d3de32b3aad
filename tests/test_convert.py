"""bnseq.batch_normalize: any model rewritten into the normalized form."""

import re

import keras
import numpy as np
import pytest
from keras import layers

import bnseq


def classes(model):
    return [type(layer).__name__ for layer in model.layers]


def configs(model):
    return [layer.get_config() for layer in model.layers]


def test_sequential():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(3, activation="relu", name="a"),
            layers.BatchNormalization(momentum=0.5, name="kept"),  # after the activation
            layers.Dense(3, name="b"),
            layers.Activation("tanh", name="t"),
            layers.BatchNormalization(epsilon=0.01, name="kept2"),
            layers.Dropout(0.1),
            layers.Dense(2, activation="softmax", name="c"),
        ]
    )
    before = configs(model)
    result = bnseq.batch_normalize(model, batch_norm={"momentum": 0.8})
    assert isinstance(result, bnseq.Sequential)
    assert result.batch_norm == {"momentum": 0.8}
    assert [layer.name for layer in result.layers] == [
        "a", "kept", "a_relu", "b", "kept2", "t", "dropout", "c", "c_bn", "c_softmax"
    ]
    a, kept, _, b, kept2, *_ = result.layers
    assert not a.use_bias and not b.use_bias
    assert kept.momentum == 0.5 and kept2.epsilon == 0.01  # options kept
    assert result.layers[8].momentum == 0.8  # new ones take batch_norm's
    assert bnseq.lint(result) == []
    assert result.output_shape == model.output_shape
    assert configs(model) == before  # the original is untouched
    assert configs(bnseq.batch_normalize(result)) == configs(result)  # idempotent


def test_wrong_axis_batch_norm_is_taken_over_on_the_right_axis():
    model = keras.Sequential(
        [
            keras.Input((3, 8, 8)),
            layers.Conv2D(4, 3, data_format="channels_first"),
            layers.BatchNormalization(name="bn"),
        ]
    )
    result = bnseq.batch_normalize(model)
    assert classes(result) == ["Conv2D", "BatchNormalization"]
    assert result.layers[1].axis == 1 and result.layers[1].name == "bn"
    assert bnseq.lint(result) == []


def branch_and_merge():
    inputs = keras.Input((8, 8, 3), name="image")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    a = layers.BatchNormalization(name="a_norm")(a)
    b = layers.Conv2D(4, 1, name="b")(inputs)
    b = layers.ReLU(name="b_relu")(b)
    b = layers.BatchNormalization(name="b_norm")(b)
    merged = layers.Add(name="merge")([a, b])
    pooled = layers.GlobalAveragePooling2D(name="pool")(merged)
    pooled = layers.BatchNormalization(name="pool_norm")(pooled)
    outputs = layers.Dense(3, name="logits")(pooled)
    return keras.Model(inputs, [outputs, merged], name="net")


def test_functional_with_a_branch_and_a_merge():
    model = branch_and_merge()
    before = configs(model)
    assert {f.code for f in bnseq.lint(model)} == {"BN001", "BN002"}
    result = bnseq.batch_normalize(model)
    assert not isinstance(result, keras.Sequential)
    assert result.name == "net"
    assert [t.shape for t in result.outputs] == [t.shape for t in model.outputs]
    assert [t.shape for t in result.inputs] == [t.shape for t in model.inputs]
    by_name = {layer.name: layer for layer in result.layers}
    graph = bnseq.graph.walk(result)
    # a: Conv2D(no bias) -> a_norm -> Activation(relu); b: Conv2D -> b_norm -> ReLU.
    assert not by_name["a"].use_bias and not by_name["b"].use_bias
    assert graph.sole_producer(by_name["a_norm"]) is by_name["a"]
    assert type(graph.consumers(by_name["a_norm"])[0]).__name__ == "Activation"
    assert graph.sole_producer(by_name["b_norm"]) is by_name["b"]
    assert graph.sole_producer(by_name["b_relu"]) is by_name["b_norm"]
    assert graph.sole_producer(by_name["pool_norm"]) is by_name["pool"]  # left alone
    assert graph.sole_producer(by_name["logits_bn"]) is by_name["logits"]
    assert graph.producers(by_name["merge"])[1] is by_name["b_relu"]
    assert bnseq.lint(result) == []
    assert configs(model) == before
    assert configs(bnseq.batch_normalize(result)) == configs(result)
    x = np.zeros((2, 8, 8, 3), "float32")
    assert [o.shape for o in result(x)] == [(2, 3), (2, 8, 8, 4)]


def test_nested_models_are_rewritten():
    inner = keras.Sequential(
        [keras.Input((3,)), layers.Dense(3, activation="relu", name="inner_d")], name="inner"
    )
    inputs = keras.Input((4,))
    model = keras.Model(inputs, inner(layers.Dense(3, name="outer_d")(inputs)))
    result = bnseq.batch_normalize(model)
    new_inner = result.get_layer("inner")
    assert isinstance(new_inner, bnseq.Sequential)
    assert classes(new_inner) == ["Dense", "BatchNormalization", "Activation"]
    assert bnseq.lint(result) == []
    assert inner.layers[0].use_bias  # the original's nested model is untouched


def test_bnseq_sequential_result_is_unchanged_structure():
    model = bnseq.Sequential(
        [keras.Input((4,)), layers.Dense(3, activation="relu"), layers.Dense(2)],
        batch_norm=True,
    )
    assert configs(bnseq.batch_normalize(model)) == configs(model)


def test_unbuilt_sequential():
    model = keras.Sequential([layers.Dense(3, activation="relu")])
    result = bnseq.batch_normalize(model)
    assert classes(result) == ["Dense", "BatchNormalization", "Activation"]
    assert result(np.ones((2, 5), "float32")).shape == (2, 3)


def test_resnet50_result_lints_clean():
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=4)
    result = bnseq.batch_normalize(model)
    assert bnseq.lint(result) == []
    batch_norms = sum(isinstance(layer, layers.BatchNormalization) for layer in result.layers)
    assert batch_norms == 53 + 1  # every one kept, plus the classifier's
    assert result.output_shape == model.output_shape


def test_error_batch_norm_false():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "batch_normalize(batch_norm=False) would change nothing. Pass True or "
            "a dict of BatchNormalization options. Received: batch_norm=False"
        ),
    ):
        bnseq.batch_normalize(keras.Sequential([layers.Dense(2)]), batch_norm=False)


def test_error_not_a_model():
    expected = "batch_normalize expects a keras.Model or the path of a .keras file. Received: model="
    with pytest.raises(TypeError, match=re.escape(expected)):
        bnseq.batch_normalize(layers.Dense(2))


def test_error_subclassed_model():
    class Net(keras.Model):
        def call(self, x):
            return x

    message = "batch_normalize could not read Net 'net', a subclassed model: it holds no layer bnseq rewrites."
    with pytest.raises(TypeError, match=re.escape(message)):
        bnseq.batch_normalize(Net())
