"""`.keras` files saved by bnseq 0.5.0 load in this version and predict as they did.

The files in tests/data were written by bnseq 0.5.0 (commit e7f0e5e, before the
package became subpackages; tests/data/README.md says how). Keras records each
bnseq class by its registered name (`bnseq>Sequential`, `bnseq>BatchNormalization`)
and the module it lived in then (`bnseq.sequential`, `bnseq.layers`): these tests
fail if a move of bnseq's modules or a rename of a class breaks loading them.
"""

import os

import keras
import numpy as np
import pytest

import bnseq

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# The files were written with Keras 3.15.1; an older Keras cannot read what 3.15 writes (Keras 3.14.0
# refuses the GlorotUniform config's `input_axes`: measured on .ci/run's oldest-versions leg), whatever bnseq does.
WRITTEN_BY = (3, 15)
pytestmark = pytest.mark.skipif(
    tuple(int(part) for part in keras.version().split(".")[:2]) < WRITTEN_BY,
    reason="these files were saved by Keras 3.15.1, which an older Keras cannot read",
)


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(DATA, "saved-0.5.0.npz")) as saved:
        return dict(saved)


def _load(name):
    return keras.saving.load_model(os.path.join(DATA, name))


def test_a_bnseq_sequential_saved_by_0_5_0_loads_as_one(expected):
    model = _load("sequential-0.5.0.keras")

    assert type(model) is bnseq.Sequential
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "BatchNormalization", "Activation", "Flatten", "Dense", "Dense", "BatchNormalization",
        "Activation",
    ]
    conv, conv_bn = model.layers[0], model.layers[1]
    assert not conv.use_bias and conv_bn.axis == 1 and conv_bn.momentum == 0.9
    assert model.layers[4].use_bias  # the Dense marked without_batch_norm kept its bias
    np.testing.assert_allclose(
        bnseq.probes.predicted(model, expected["sequential_x"]), expected["sequential_y"], rtol=1e-5, atol=1e-6
    )
    # Still a bnseq.Sequential that inserts BatchNormalization on add().
    model.add(keras.layers.Dense(3, activation="relu", name="added"))
    assert [type(layer).__name__ for layer in model.layers[-3:]] == ["Dense", "BatchNormalization", "Activation"]


def test_a_functional_model_with_route_three_batch_normalization_loads(expected):
    model = _load("functional-0.5.0.keras")

    batch_norm = model.get_layer("auto_bn")
    assert batch_norm.axis == 1
    np.testing.assert_allclose(
        bnseq.probes.predicted(model, expected["functional_x"]), expected["functional_y"], rtol=1e-5, atol=1e-6
    )


def test_an_unsettled_bnseq_batch_normalization_loads_unsettled_and_settles():
    model = _load("unbuilt-0.5.0.keras")

    assert type(model) is bnseq.Sequential and not model.built
    batch_norm = model.layers[-1]
    assert type(batch_norm) is bnseq.BatchNormalization
    assert batch_norm.get_config()["axis"] == "auto"
    model.build((None, 2, 9))
    assert batch_norm.axis == 1  # after a channels_first Conv1D
