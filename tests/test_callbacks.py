"""bnseq.callbacks.Recalibrate: exact statistics inside fit."""

import keras
import numpy as np
import pytest
from keras import layers

import bnseq


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8, 1).astype("float32")
    return x[:1400], y[:1400], x[1400:], y[1400:]


def convnet():
    """Keras's default momentum 0.99: after 88 steps the moving statistics still mostly hold the start."""
    model = bnseq.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            bnseq.without_batch_norm(layers.Dense(10, activation="softmax")),
        ],
        batch_norm=True,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def test_validation_sees_recalibrated_statistics_from_the_first_epoch(digits):
    x, y, x_val, y_val = digits
    stale = convnet()
    without = stale.fit(x, y, validation_data=(x_val, y_val), epochs=2, batch_size=32, verbose=0)
    keras.utils.set_random_seed(0)
    model = convnet()
    callback = bnseq.callbacks.Recalibrate(x, batch_size=256)
    history = model.fit(
        x, y, validation_data=(x_val, y_val), epochs=2, batch_size=32, verbose=0, callbacks=[callback]
    )
    # Measured on TensorFlow: 0.10 and 0.12 with the moving statistics, 0.91 and 0.92 recalibrated
    # (PyTorch: 0.48 and 0.54 with the moving statistics).
    stale_accuracy, exact_accuracy = without.history["val_accuracy"], history.history["val_accuracy"]
    assert min(exact_accuracy) > 0.8
    assert all(exact > moving + 0.2 for exact, moving in zip(exact_accuracy, stale_accuracy))
    assert [epoch for epoch, _ in callback.reports] == [0, 1]
    assert [row.samples for row in callback.reports[0][1]] == [1400 * 36, 1400 * 16]
    # Recalibrated before validation, not after: the last validation is the model as fit returns it.
    _, accuracy = model.evaluate(x_val, y_val, verbose=0)
    assert accuracy == pytest.approx(history.history["val_accuracy"][-1], abs=1e-6)
    # and its statistics are exact: recalibrating again changes them by rounding only.
    again = bnseq.recalibrate(model, x, batch_size=256, verbose=0)
    assert max(row.mean_change for row in again) < 1e-4


def test_epochs_without_validation_and_the_end_of_training(digits):
    x, y, x_val, y_val = digits
    small = (x[:256], y[:256])
    model = convnet()
    every_epoch = bnseq.callbacks.Recalibrate(x[:128])
    model.fit(
        *small, validation_data=(x_val, y_val), validation_freq=2, epochs=3, batch_size=64, verbose=0,
        callbacks=[every_epoch],
    )
    assert [epoch for epoch, _ in every_epoch.reports] == [0, 1, 2]  # 1 before validation, 0 and 2 without
    every_second = bnseq.callbacks.Recalibrate(x[:128], steps=2, frequency=2)
    model.fit(*small, epochs=3, batch_size=64, verbose=0, callbacks=[every_second])
    assert [epoch for epoch, _ in every_second.reports] == [1, None]  # and once at the end
    assert [row.samples for row in every_second.reports[0][1]][0] == 2 * 32 * 36  # steps=2 of 32
    # Outside fit (evaluate alone), it does nothing.
    model.evaluate(x_val, y_val, verbose=0, callbacks=[every_second])
    assert len(every_second.reports) == 2


def test_bad_arguments():
    x = np.zeros((4, 3), "float32")
    with pytest.raises(ValueError, match=r"`frequency` must be 'epoch' or a positive int \(every that many "
                       r"epochs\). Received: frequency='batch'"):
        bnseq.callbacks.Recalibrate(x, frequency="batch")
    with pytest.raises(ValueError, match="Received: frequency=0$"):
        bnseq.callbacks.Recalibrate(x, frequency=0)
    with pytest.raises(ValueError, match="Received: frequency=True$"):
        bnseq.callbacks.Recalibrate(x, frequency=True)
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive int or None. Received: batch_size=0"):
        bnseq.callbacks.Recalibrate(x, batch_size=0)
