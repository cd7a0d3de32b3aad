"""What a hostile new user found (issue 11): each case, and the model unchanged after every error."""

import re
import subprocess
import sys
import warnings

import h5py
import keras
import numpy as np
import pytest
from keras import layers

import bnseq


def names(model):
    return [layer.name for layer in model.layers]


def test_one_initializer_object_gives_each_batch_norm_its_own_values():
    model = bnseq.Sequential(
        [keras.Input((6,)), layers.Dense(8), layers.Dense(8)],
        batch_norm={"gamma_initializer": keras.initializers.RandomNormal(1.0, 0.02)},
    )
    first, second = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    gamma_1, gamma_2 = (keras.ops.convert_to_numpy(bn.gamma) for bn in (first, second))
    assert not np.allclose(gamma_1, gamma_2)
    assert abs(gamma_1.mean() - 1.0) < 0.05 and abs(gamma_2.mean() - 1.0) < 0.05


def test_one_activation_layer_for_two_dense_layers_works_as_in_keras():
    act = layers.LeakyReLU(negative_slope=0.2, name="leaky")
    plain = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation=act), layers.Dense(2, activation=act)])
    assert plain.output_shape == (None, 2)
    model = bnseq.Sequential(
        [keras.Input((4,)), layers.Dense(3, activation=act, name="a"), layers.Dense(2, activation=act, name="b")],
        batch_norm=True,
    )
    assert names(model) == ["a", "a_bn", "leaky", "b", "b_bn", "leaky_1"]
    assert model.layers[5].negative_slope == 0.2 and model.layers[5] is not act


def test_one_prelu_for_two_dense_layers_is_a_clear_error_and_the_model_is_unchanged():
    prelu = layers.PReLU(name="p")
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(3, activation=prelu, name="a")], batch_norm=True)
    before = names(model)
    second = layers.Dense(3, activation=prelu, name="b")
    with pytest.raises(ValueError) as error:
        model.add(second)
    assert str(error.value) == (
        "Dense 'b' (layer 3) has the activation layer PReLU 'p', which is already the activation of "
        f"Dense 'a' in '{model.name}'. It has weights, so bnseq cannot give each unit a copy without "
        f"unsharing them. Give each layer its own activation layer. Received: layer={second!r}"
    )
    assert names(model) == before
    assert second.activation is prelu and second.use_bias


def test_list_form_warns_as_add_does():
    def stack():
        return [
            keras.Input((5, 8)),
            layers.Dense(4, use_bias=False, name="d"),
            layers.BatchNormalization(axis=1, name="bn"),
        ]

    with pytest.warns(bnseq.BatchNormPlacementWarning) as listed:
        bnseq.Sequential(stack())
    model = bnseq.Sequential()
    with pytest.warns(bnseq.BatchNormPlacementWarning) as added:
        for layer in stack():
            model.add(layer)
    assert [str(w.message) for w in listed] == [str(w.message) for w in added] == [
        "BatchNormalization 'bn' normalizes axis 1, but the channels of Dense 'd' (features) are on "
        "axis -1. Write `BatchNormalization(axis=-1)`."
    ]


def test_weights_file_has_the_layout_of_keras_sequential(tmp_path):
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(3, activation="relu")], batch_norm=True)
    plain = keras.Sequential([keras.Input((4,)), *[layer for layer in model.layers]])
    model.save_weights(tmp_path / "ours.weights.h5")
    plain.save_weights(tmp_path / "theirs.weights.h5")

    def groups(path):
        found = []
        with h5py.File(path, "r") as file:
            file.visit(found.append)
        return sorted(found)

    assert groups(tmp_path / "ours.weights.h5") == groups(tmp_path / "theirs.weights.h5")
    assert not any("_bnseq" in name for name in groups(tmp_path / "ours.weights.h5"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epsilon": float("inf")}, "`epsilon` must be a finite number. Received: batch_norm={'epsilon': inf}"),
        ({"epsilon": float("nan")}, "`epsilon` must be a finite number. Received: batch_norm={'epsilon': nan}"),
        ({"momentum": True}, "`momentum` must be a finite number. Received: batch_norm={'momentum': True}"),
        ({"momentum": "0.9"}, "`momentum` must be a finite number. Received: batch_norm={'momentum': '0.9'}"),
    ],
)
def test_option_values_a_keras_user_would_not_pass(options, message):
    with pytest.raises(ValueError, match=re.escape(f"`batch_norm`: {message}")):
        bnseq.Sequential(batch_norm=options)


def test_numpy_booleans_are_booleans():
    model = bnseq.Sequential(
        [keras.Input((4,)), layers.Dense(3)], batch_norm={"center": np.False_, "scale": np.True_}
    )
    bn = model.layers[1]
    assert bn.center is False and bn.scale is True
    assert model.batch_norm == {"center": False, "scale": True}


def test_pop_through_the_input_layer_keras_removes_it_then_raises():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    model.pop()
    with pytest.raises(IndexError):
        model.pop()  # only the InputLayer left: Keras removes it, then raises
    model.add(keras.Input((5,)))
    model.add(layers.Dense(3))
    assert model.output_shape == (None, 3) and model.input_shape == (None, 5)


@pytest.mark.parametrize("layers_first", [[keras.Input((4,))], [keras.Input((4,)), layers.Dense(2)]])
def test_pop_of_the_input_layer_raises_and_keeps_the_model(layers_first):
    model = bnseq.Sequential(layers_first, batch_norm=True)
    while len(model.layers):
        model.pop()
    with pytest.raises(IndexError, match="has no layers to pop.*the model's input stays"):
        model.pop()
    assert [type(layer).__name__ for layer in model._layers] == ["InputLayer"]
    model.add(layers.Dense(3))  # the model still has its input
    assert model.output_shape == (None, 3) and model.input_shape == (None, 4)


@pytest.mark.parametrize("flag", [np.True_, np.bool_(True), True])
def test_numpy_booleans_for_batch_norm(flag):
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(3)], batch_norm=flag)
    assert [type(layer).__name__ for layer in model.layers] == ["Dense", "BatchNormalization"]
    plain = bnseq.Sequential([keras.Input((4,))], batch_norm=True)
    plain.add(layers.Dense(3), batch_norm=np.False_)
    assert [type(layer).__name__ for layer in plain.layers] == ["Dense"]


def test_h5_saving_warns_and_points_to_keras(tmp_path):
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(3)], batch_norm=True, name="net")
    path = tmp_path / "net.h5"
    with pytest.warns(UserWarning) as record:
        model.save(path)
    messages = [str(w.message) for w in record if "legacy HDF5" in str(w.message)]
    assert messages == [
        f"bnseq.Sequential 'net' is saved to '{path}' in Keras's legacy HDF5 format, which loads back "
        "as a plain keras.Sequential: the layers are kept, bnseq's settings (batch_norm, the units "
        "pop() takes back) are not. Save to a .keras file to keep them."
    ]


def test_list_form_errors_name_the_position_in_the_list():
    with pytest.raises(ValueError) as error:
        bnseq.Sequential([keras.Input((4,)), layers.Dense(2), "relu"], name="net")
    assert str(error.value) == (
        "Only instances of `keras.Layer` can be added to a Sequential model. Received: relu (of type "
        "<class 'str'>) as item 2 of the layers list of 'net'."
    )
    built = layers.Dense(3, name="built")
    built.build((None, 4))
    with pytest.raises(ValueError, match=re.escape("Dense 'built' (item 2 of the layers list) is already built")):
        bnseq.Sequential([keras.Input((4,)), layers.Dense(4), built], batch_norm=True)


def test_no_bias_warning_from_an_add_that_fails():
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(3, name="taken")], batch_norm=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        duplicate = layers.Dense(3, bias_regularizer="l2", name="taken")  # a name clash, found on append
        with pytest.raises(ValueError, match="unique names"):
            model.add(duplicate)
    assert [w for w in record if w.category is bnseq.BatchNormPlacementWarning] == []
    assert names(model) == ["taken", "taken_bn"]
    assert duplicate.use_bias and duplicate.bias_regularizer is not None


def test_python_m_bnseq_cli_fold(tmp_path):
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(3)], batch_norm=True)
    model.save(tmp_path / "in.keras")
    result = subprocess.run(
        [sys.executable, "-m", "bnseq.cli", "fold", str(tmp_path / "in.keras"), str(tmp_path / "out.keras")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Folded 1 of 1 BatchNormalization layers" in result.stdout
    assert (tmp_path / "out.keras").exists()


def test_warnings_of_add_without_rebuild_come_when_the_model_is_built():
    model = bnseq.Sequential([keras.Input((5, 8))])
    model.add(layers.Dense(4, use_bias=False, name="d"), rebuild=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.add(layers.BatchNormalization(axis=1, name="bn"), rebuild=False)
    assert [w for w in record if w.category is bnseq.BatchNormPlacementWarning] == []
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        model.build((None, 5, 8))
    assert [str(w.message) for w in record] == [
        "BatchNormalization 'bn' normalizes axis 1, but the channels of Dense 'd' (features) are on "
        "axis -1. Write `BatchNormalization(axis=-1)`."
    ]
