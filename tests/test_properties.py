"""Invariants of bnseq.Sequential over random stacks of the eleven layer kinds."""

import keras
import numpy as np
from hypothesis import given
from hypothesis import settings
from keras import layers

import bnseq
from bnseq.probes import infer
from tests.strategies import build_by_hand
from tests.strategies import stacks


def build_bnseq(shape, specs, model_batch_norm):
    model = bnseq.Sequential(batch_norm=model_batch_norm)
    model.add(keras.Input(shape))
    for spec in specs:
        model.add(spec.make(), batch_norm=spec.batch_norm)
    return model


def build_plain(shape, specs):
    return keras.Sequential([keras.Input(shape), *(spec.make() for spec in specs)])


@given(stacks())
def test_structure_shapes_and_parameters(stack):
    shape, specs, model_batch_norm = stack
    model = build_bnseq(shape, specs, model_batch_norm)

    # Structure: each normalized layer is bias-free and linear, followed by a
    # BatchNormalization on its channel axis and then its own activation.
    position = 0
    for spec in specs:
        layer = model.layers[position]
        assert isinstance(layer, spec.kind)
        if not spec.normalized(model_batch_norm):
            assert layer.use_bias == spec.use_bias
            position += 1
            continue
        assert not layer.use_bias
        assert layer.activation is keras.activations.linear
        bn = model.layers[position + 1]
        assert isinstance(bn, layers.BatchNormalization)
        assert bn.axis == spec.channel_axis
        expected = spec.make().activation
        position += 2
        if isinstance(expected, keras.Layer):
            assert isinstance(model.layers[position], type(expected))
            position += 1
        elif expected is not keras.activations.linear:
            assert isinstance(model.layers[position], layers.Activation)
            assert model.layers[position].activation is expected
            position += 1
    assert position == len(model.layers)

    # Shapes as in plain Keras; parameters as written by hand.
    assert model.output_shape == build_plain(shape, specs).output_shape
    by_hand = build_by_hand(shape, specs, model_batch_norm)
    assert model.count_params() == by_hand.count_params()
    assert [type(layer) for layer in model.layers] == [type(layer) for layer in by_hand.layers]


@settings(max_examples=6)
@given(stacks(max_layers=3))
def test_keras_file_round_trip(tmp_path_factory, stack):
    shape, specs, model_batch_norm = stack
    model = build_bnseq(shape, specs, model_batch_norm)
    path = tmp_path_factory.mktemp("round_trip") / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert [type(layer) for layer in restored.layers] == [type(layer) for layer in model.layers]
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    np.testing.assert_allclose(
        infer(restored, x),
        infer(model, x),
        rtol=1e-6,
        atol=1e-6,
    )
