"""Saving and loading a bnseq.Sequential: every path keeps the layers as they are.

The trap: `keras.Sequential.from_config` calls `add()` for each saved layer, so a
naive subclass would insert a second BatchNormalization after every linear
layer on load. Each round trip below must give the same layer classes in order,
the same weights and the same predictions.
"""

import copy
import pickle
import warnings
from unittest import mock

import keras
import numpy as np
import pytest
from keras import layers

import bnseq

X = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")


def _layers():
    return [
        layers.Conv2D(3, 3, activation="relu"),
        layers.DepthwiseConv2D(2, activation=layers.LeakyReLU(negative_slope=0.2)),
        layers.Flatten(),
        layers.Dense(5, activation="tanh", activity_regularizer="l2"),
        layers.Dense(2),
    ]


def with_input():
    model = bnseq.Sequential(
        [keras.Input(X.shape[1:]), *_layers()],
        batch_norm={"momentum": 0.5, "gamma_initializer": keras.initializers.Constant(2.0)},
    )
    model.pop()
    model.add(layers.Dense(2, activation="softmax"), batch_norm=False)
    return model


def built_on_data():
    model = bnseq.Sequential(_layers(), batch_norm=True)
    model(X)
    return model


def trained(model, x=X):
    """Non-trivial weights and BatchNormalization statistics."""
    model.compile(optimizer="sgd", loss="mse")
    y = np.ones((len(x), *model.output_shape[1:]))
    model.fit(x, y, epochs=2, batch_size=2, verbose=0)
    return model


def save_and_load(model, tmp_path):
    path = tmp_path / "model.keras"
    model.save(path)
    return keras.saving.load_model(path)


def config_round_trip(model, tmp_path):
    restored = bnseq.Sequential.from_config(model.get_config())
    restored.set_weights(model.get_weights())
    return restored


def json_round_trip(model, tmp_path):
    restored = keras.models.model_from_json(model.to_json())
    restored.set_weights(model.get_weights())
    return restored


def weights_round_trip(model, tmp_path):
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    fresh = bnseq.Sequential.from_config(model.get_config())
    fresh.load_weights(path)
    return fresh


def clone(model, tmp_path):
    cloned = keras.models.clone_model(model)
    cloned.set_weights(model.get_weights())
    return cloned


ROUND_TRIPS = {
    "keras_file": save_and_load,
    "config": config_round_trip,
    "json": json_round_trip,
    "deepcopy": lambda model, tmp_path: copy.deepcopy(model),
    "pickle": lambda model, tmp_path: pickle.loads(pickle.dumps(model)),
    "weights": weights_round_trip,
    "clone_model": clone,
}


def describe(model):
    return [
        (type(layer).__name__, layer.get_config().get("use_bias"), layer.get_config().get("axis"))
        for layer in model.layers
    ]


@pytest.mark.parametrize("make", [with_input, built_on_data])
@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_round_trip_keeps_layers_weights_and_predictions(make, round_trip, tmp_path):
    model = trained(make())
    restored = ROUND_TRIPS[round_trip](model, tmp_path)
    assert describe(restored) == describe(model)
    assert [layer.name for layer in restored.layers] == [layer.name for layer in model.layers]
    for ours, theirs in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_allclose(
        restored.predict(X, verbose=0), model.predict(X, verbose=0), rtol=1e-6, atol=1e-6
    )
    if round_trip == "clone_model":
        # Keras builds clones of any Sequential as a plain keras.Sequential.
        assert type(restored) is keras.Sequential
    else:
        assert type(restored) is bnseq.Sequential
        assert keras.saving.serialize_keras_object(
            restored.batch_norm
        ) == keras.saving.serialize_keras_object(model.batch_norm)
        assert restored._unit_sizes == model._unit_sizes


def test_loaded_model_keeps_its_options_and_units(tmp_path):
    model = with_input()
    restored = save_and_load(model, tmp_path)
    assert restored.batch_norm["momentum"] == 0.5
    assert isinstance(restored.batch_norm["gamma_initializer"], keras.initializers.Constant)
    assert restored.layers[1].momentum == 0.5
    # New layers added after loading follow the saved setting...
    restored.add(layers.Dense(3, activation="relu"))
    assert type(restored.layers[-2]).__name__ == "BatchNormalization"
    assert restored.layers[-2].momentum == 0.5
    # ...and pop() takes back whole units, also those saved before.
    restored.pop()
    softmax = restored.pop()
    assert softmax.name == model.layers[-1].name
    dense = restored.pop()
    assert dense.name == model.layers[-4].name
    assert type(restored.layers[-1]).__name__ == "Flatten"


def test_loading_builds_once(tmp_path):
    """from_config adds the saved layers without rebuilding after each one."""
    model = with_input()
    config = model.get_config()
    calls = []
    original = keras.Sequential.build

    def counting_build(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    # The count is taken on `Sequential.build` itself: Keras wraps the method
    # per instance at construction, after which the class attribute is read.
    with mock.patch.object(keras.Sequential, "build", counting_build):
        restored = bnseq.Sequential.from_config(config)
    assert calls == [model.name]
    assert describe(restored) == describe(model)


def test_from_config_of_a_plain_keras_sequential():
    plain = keras.Sequential([keras.Input((3,)), layers.Dense(2), layers.BatchNormalization()])
    restored = bnseq.Sequential.from_config(plain.get_config())
    assert [type(layer).__name__ for layer in restored.layers] == ["Dense", "BatchNormalization"]
    assert restored.batch_norm is False
    assert restored._unit_sizes == (1, 1)


def test_from_config_error_names_the_missing_keys():
    with pytest.raises(
        ValueError,
        match="A Sequential model configuration must be a dictionary containing "
        "the 'name' and 'layers' keys. Received: config={'layers': \\[\\]}",
    ):
        bnseq.Sequential.from_config({"layers": []})


def test_nested_in_a_functional_model(tmp_path):
    inner = bnseq.Sequential(
        [keras.Input((4,)), layers.Dense(3, activation="relu")], batch_norm=True
    )
    inputs = keras.Input((4,))
    outer = keras.Model(inputs, layers.Dense(1)(inner(inputs)))
    x = X.reshape(len(X), -1)[:, :4]
    trained(inner, x)
    restored = save_and_load(outer, tmp_path)
    restored_inner = restored.layers[1]
    assert type(restored_inner) is bnseq.Sequential
    assert describe(restored_inner) == describe(inner)
    np.testing.assert_allclose(restored.predict(x, verbose=0), outer.predict(x, verbose=0), rtol=1e-6)


def test_a_compiled_model_loads_compiled_and_trains_on_from_its_optimizer_state(tmp_path):
    # Keras skips compile_from_config, with a UserWarning, for a model that overrides compile().
    model = bnseq.Sequential([keras.Input(X.shape[1:]), *_layers()], batch_norm=True)
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    y = np.ones((len(X), *model.output_shape[1:]))
    model.fit(X, y, epochs=2, batch_size=2, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = keras.saving.load_model(path)
    assert loaded.compiled and type(loaded.optimizer) is type(model.optimizer)
    iterations = [int(keras.ops.convert_to_numpy(each.optimizer.iterations)) for each in (model, loaded)]
    assert iterations == [4, 4]
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored), keras.ops.convert_to_numpy(saved))
    model.fit(X, y, epochs=1, batch_size=2, shuffle=False, verbose=0)
    loaded.fit(X, y, epochs=1, batch_size=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
