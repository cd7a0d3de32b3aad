"""Mixed precision: the inserted layers follow the linear layer's dtype policy."""

import keras
import numpy as np
import pytest
from keras import layers

import bnseq

# The tolerance bnseq documents for folding a mixed_float16 model: relative max
# error of the folded model's outputs against the original's, in inference.
# float16 has a 2**-11 (~5e-4) rounding step and each layer rounds; measured
# errors on the models below are around 1e-3.
FLOAT16_FOLD_TOLERANCE = 1e-2


@pytest.fixture
def mixed_policy():
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy("float32")


def make():
    return bnseq.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(4, dtype="float32"),  # the usual float32 output layer
        ],
        batch_norm=True,
    )


def test_global_policy(mixed_policy):
    model = make()
    conv, bn, act = model.layers[:3]
    for layer in (conv, bn, act):
        assert layer.dtype_policy.name == "mixed_float16"
    assert bn.compute_dtype == "float16"
    for variable in bn.weights:
        assert variable.dtype == "float32"  # BatchNormalization variables stay float32
    out_dense, out_bn = model.layers[-2:]
    assert out_dense.dtype_policy.name == out_bn.dtype_policy.name == "float32"
    assert keras.backend.standardize_dtype(model.outputs[0].dtype) == "float32"


def test_per_layer_dtype():
    model = bnseq.Sequential([keras.Input((5,))], batch_norm=True)
    model.add(layers.Dense(4, activation="tanh", dtype="mixed_float16"))
    model.add(layers.Dense(2))
    dense, bn, act, out, out_bn = model.layers
    assert dense.dtype_policy.name == bn.dtype_policy.name == act.dtype_policy.name == "mixed_float16"
    assert bn.gamma.dtype == "float32" and bn.compute_dtype == "float16"
    assert out.dtype_policy.name == out_bn.dtype_policy.name == "float32"


def test_trains_and_folds(mixed_policy, tmp_path):
    model = make()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, rng.normal(size=(32, 4)), epochs=3, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()

    folded = bnseq.fold(model)
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded.layers)
    assert folded.layers[0].dtype_policy.name == "mixed_float16"
    assert folded.layers[0].kernel.dtype == "float32"
    expected = keras.ops.convert_to_numpy(model(x, training=False)).astype("float64")
    actual = keras.ops.convert_to_numpy(folded(x)).astype("float64")
    relative = np.max(np.abs(expected - actual)) / np.max(np.abs(expected))
    assert relative <= FLOAT16_FOLD_TOLERANCE

    path = tmp_path / "mixed.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert [layer.dtype_policy.name for layer in restored.layers] == [
        layer.dtype_policy.name for layer in model.layers
    ]
