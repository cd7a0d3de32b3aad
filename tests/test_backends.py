"""What differs by backend, tested on whichever backend runs the suite."""

import re

import keras
import numpy as np
import pytest
from keras import layers

import bnseq

BACKEND = keras.backend.backend()


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow can synchronize")
def test_synchronized_fails_when_the_model_is_made_on_other_backends():
    message = re.escape(
        "`batch_norm`: `synchronized=True` needs the TensorFlow backend, where Keras "
        "all-reduces the batch statistics across the replicas of a tf.distribute "
        f"strategy; this process runs the {BACKEND} backend. "
        + {
            "jax": "On JAX there is nothing to synchronize: under keras.distribution.DataParallel a batch is "
            "one array sharded over the devices, and its mean is computed across them. ",
            "torch": "Keras has no distribution API on PyTorch: under DistributedDataParallel each process "
            "normalizes its own batch; bnseq.recalibrate pools the statistics of a torch.distributed group. ",
        }[BACKEND]
        + "Set KERAS_BACKEND=tensorflow before importing Keras, or leave `synchronized` "
        "out. Received: batch_norm={'synchronized': True}"
    )
    with pytest.raises(ValueError, match=message):
        bnseq.Sequential(batch_norm={"synchronized": True})
    model = bnseq.Sequential([keras.Input((3,))])
    with pytest.raises(ValueError, match="needs the TensorFlow backend"):
        model.add(layers.Dense(2), batch_norm={"synchronized": True})
    assert model.layers == []


@pytest.mark.skipif(BACKEND != "tensorflow", reason="synchronized BN is TensorFlow-only")
def test_synchronized_is_accepted_on_tensorflow():
    model = bnseq.Sequential(
        [keras.Input((3,)), layers.Dense(2, activation="relu")],
        batch_norm={"synchronized": True},
    )
    assert model.layers[1].synchronized


def test_activation_layer_moves_out_cleanly_on_every_backend():
    """On PyTorch a Layer attribute is a registered child module: moving it out
    of the Dense must unregister it there too."""
    leaky = layers.LeakyReLU(negative_slope=0.1)
    dense = layers.Dense(3, activation=leaky)
    model = bnseq.Sequential([keras.Input((4,)), dense], batch_norm=True)
    assert model.layers[2] is leaky
    assert dense.activation is keras.activations.linear
    if BACKEND == "torch":
        assert "activation" not in dict(dense.named_children())
    x = np.ones((2, 4), "float32")
    out = keras.ops.convert_to_numpy(model(x, training=False))
    assert out.shape == (2, 3) and np.isfinite(out).all()


def test_trains_on_this_backend():
    model = bnseq.Sequential(
        [keras.Input((6,)), layers.Dense(8, activation="relu"), layers.Dense(1)], batch_norm=True
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    history = model.fit(rng.normal(size=(32, 6)), rng.normal(size=(32, 1)), epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    folded = bnseq.fold(model)
    x = rng.normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(folded(x)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
