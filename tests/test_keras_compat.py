"""With batch_norm=False, bnseq.Sequential behaves as keras.Sequential.

Each test runs the same code against both classes and compares what happens:
results, or the exception type and message.
"""

import keras
import numpy as np
import pytest
from keras import layers

import bnseq

CLASSES = [keras.Sequential, bnseq.Sequential]


def outcome(action):
    try:
        return ("ok", action())
    except Exception as error:  # the comparison is the point
        return (type(error), str(error).split(" Received")[0])


def same_in_both(make_action):
    results = []
    for cls in CLASSES:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        results.append(outcome(make_action(cls)))
    return results


SCENARIOS = {
    "list_constructor": lambda cls: lambda: [
        type(layer).__name__
        for layer in cls([keras.Input((3,)), layers.Dense(2), layers.BatchNormalization(axis=-1)]).layers
    ],
    "deferred_build": lambda cls: lambda: cls([layers.Dense(2), layers.Dense(1)])(np.ones((2, 3))).shape,
    "explicit_build": lambda cls: lambda: _built(cls).output_shape,
    "second_input": lambda cls: lambda: cls([keras.Input((3,))]).add(keras.Input((4,))),
    "duplicate_name": lambda cls: lambda: cls(
        [layers.Dense(2, name="x"), layers.Dense(2, name="x")]
    ),
    "set_layers": lambda cls: lambda: setattr(cls(), "layers", []),
    "build_no_layers": lambda cls: lambda: cls().build((None, 3)),
    "wrong_input_shape": lambda cls: lambda: cls([keras.Input((3,)), layers.Dense(2)]).build((None, 4)),
    "input_shape_unbuilt": lambda cls: lambda: cls([layers.Dense(2)]).input_shape,
    "pop_and_rebuild": lambda cls: lambda: _popped(cls),
    "weights_count": lambda cls: lambda: len(cls([keras.Input((3,)), layers.Dense(2)]).weights),
    "fit": lambda cls: lambda: _fitted(cls),
    "layer_with_two_inputs": lambda cls: lambda: cls([keras.Input((3,)), layers.Add()]),
    "name_and_trainable": lambda cls: lambda: (
        cls(name="m", trainable=False).name,
        cls(name="m", trainable=False).trainable,
    ),
}


def _built(cls):
    model = cls([layers.Dense(2)])
    model.build((None, 5))
    return model


def _popped(cls):
    model = cls([keras.Input((3,)), layers.Dense(4), layers.Dense(2)])
    popped = model.pop()
    return type(popped).__name__, model.output_shape


def _fitted(cls):
    model = cls([keras.Input((3,)), layers.Dense(2), layers.BatchNormalization(axis=-1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model.fit(x, np.zeros((8, 2)), epochs=1, verbose=0)
    return np.round(model.predict(x, verbose=0), 5).tolist()


@pytest.mark.filterwarnings("ignore::bnseq.BatchNormPlacementWarning")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_behaviour_as_keras_sequential(scenario):
    theirs, ours = same_in_both(SCENARIOS[scenario])
    assert ours == theirs


def test_is_a_keras_sequential():
    model = bnseq.Sequential()
    assert isinstance(model, keras.Sequential)
    assert isinstance(model, keras.Model)


def test_keras_sequential_private_surface():
    """Fails loudly if keras.Sequential's private state, which bnseq.Sequential works with, changes.

    bnseq.Sequential reads and writes `_layers` (the stack, InputLayer first),
    `_functional` (the graph built last) and calls `_maybe_rebuild()`, as
    Keras's own `add`, `pop` and `from_config` do (checked on Keras 3.14, 3.15).
    """
    model = keras.Sequential([keras.Input((3,))])
    assert isinstance(model._layers, list) and isinstance(model._layers[0], keras.layers.InputLayer)
    assert model._functional is None or isinstance(model._functional, keras.Model)
    model._layers.append(keras.layers.Dense(2))
    model._maybe_rebuild()
    assert isinstance(model._functional, keras.Model) and model.output_shape == (None, 2)
