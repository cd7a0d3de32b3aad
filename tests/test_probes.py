"""What the machine can run: channels_first on TensorFlow without oneDNN.

The .ci/run leg with TF_ENABLE_ONEDNN_OPTS=0 runs these on the machine kind
without channels_first kernels, whatever CPU CI has; the main run on the CPU's
default.
"""

import re
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import probes


def conv_first():
    return layers.Conv2D(4, 3, data_format="channels_first", name="c")


def model_channels_first():
    return bnseq.Sequential([keras.Input((3, 6, 6)), conv_first(), layers.Flatten(), layers.Dense(2)], batch_norm=True)


def kernels_exist():
    """Independently of `probes`: does an eager channels_first Conv2D run?"""
    layer = layers.Conv2D(1, 1, data_format="channels_first")
    try:
        layer(np.zeros((1, 1, 2, 2), "float32"))
    except Exception as error:  # TensorFlow's UnimplementedError
        assert "NHWC" in str(error) or "NCHW" in str(error) or "Unimplemented" in type(error).__name__
        return False
    return True


def test_probe_agrees_with_an_eager_call():
    assert probes.channels_first_runs() == kernels_exist()


@pytest.fixture
def fresh_warning_state():
    probes._warned.clear()
    yield
    probes._warned.clear()


def test_platform_warning_once_when_a_channels_first_layer_is_added(fresh_warning_state):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_channels_first()
        model_channels_first()
        bnseq.Sequential([keras.Input((6, 6, 3)), layers.Conv2D(4, 3)], batch_norm=True)
    platform = [w for w in caught if issubclass(w.category, bnseq.PlatformWarning)]
    if kernels_exist():
        assert platform == []
        return
    assert len(platform) == 1
    assert platform[0].filename == __file__  # points at the user's line
    setting = probes.os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    setting = "TF_ENABLE_ONEDNN_OPTS is unset" if setting is None else f"TF_ENABLE_ONEDNN_OPTS={setting}"
    assert str(platform[0].message) == (
        "Conv2D 'c' is channels_first, and TensorFlow on this CPU has no kernels for "
        "channels_first convolutions (they come with oneDNN, which is off: "
        f"{setting}, and TensorFlow turns it on by default only on "
        "CPUs with AVX-512; https://github.com/keras-team/keras/issues/23650). Eager calls such "
        "as `model(x)` fail here with UnimplementedError. bnseq.Sequential.compile() turns "
        "jit_compile='auto' into jit_compile=True for such a model, so fit, evaluate and "
        "predict run compiled by XLA. Other fixes: `model.compile(..., jit_compile=True)` for "
        "any model, TF_ENABLE_ONEDNN_OPTS=1 set before TensorFlow is imported, the JAX or "
        "PyTorch backend, or channels_last."
    )


def test_compile_makes_a_channels_first_model_work_here():
    model = model_channels_first()
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(3).normal(size=(4, 3, 6, 6)).astype("float32")
    history = model.fit(x, np.zeros((4, 2), "float32"), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    predicted = model.predict(x, verbose=0)
    np.testing.assert_allclose(predicted, probes.infer(model, x), rtol=1e-5, atol=1e-6)
    if not kernels_exist():
        assert model.jit_compile is True
    else:  # Keras's own choice, untouched
        plain = keras.Sequential(model.layers)
        plain.compile(optimizer="sgd", loss="mse")
        assert model.jit_compile == plain.jit_compile


@pytest.mark.parametrize("explicit", [{"jit_compile": False}, {"run_eagerly": True}])
def test_compile_keeps_an_explicit_choice(explicit):
    model = model_channels_first()
    model.compile(optimizer="sgd", loss="mse", **explicit)
    assert model.jit_compile is False


def test_infer_matches_a_numpy_convolution():
    """Numerics of a channels_first convolution on any machine, through infer."""
    layer = layers.Conv2D(2, 1, use_bias=False, data_format="channels_first")
    layer.build((None, 3, 2, 2))
    kernel = np.random.default_rng(4).normal(size=(1, 1, 3, 2)).astype("float32")
    layer.kernel.assign(kernel)
    x = np.random.default_rng(5).normal(size=(2, 3, 2, 2)).astype("float32")
    expected = np.einsum("bchw,co->bohw", x, kernel[0, 0])
    np.testing.assert_allclose(probes.infer(layer, x), expected, rtol=1e-5, atol=1e-6)
    if not kernels_exist():
        with pytest.raises(Exception, match=re.escape("NHWC")):
            layer(x)


@pytest.mark.parametrize("make", [model_channels_first, lambda: bnseq.Sequential(
    [keras.Input((5,)), layers.Dense(3)], batch_norm=True)])
def test_predicted_in_batches_equals_one_batch(make):
    """On this machine's path (XLA for channels_first without oneDNN, else predict), batch by batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bnseq.PlatformWarning)
        model = make()
    x = np.random.default_rng(0).normal(size=(7, *model.inputs[0].shape[1:])).astype("float32")
    whole = probes.predicted(model, x)
    np.testing.assert_allclose(probes.predicted(model, x, batch_size=3), whole, rtol=1e-5, atol=1e-6)
    assert whole.shape == (7, 2 if make is model_channels_first else 3)


@pytest.mark.parametrize("make", [model_channels_first, lambda: bnseq.Sequential(
    [keras.Input((5,)), layers.Dense(3)], batch_norm=True)])
def test_inference_step_computes_what_predict_does_without_its_pipeline(make, monkeypatch):
    """What export times: on this machine's path, the same outputs as `predicted`, never `predict` itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bnseq.PlatformWarning)
        model = make()
    x = np.random.default_rng(0).normal(size=(4, *model.inputs[0].shape[1:])).astype("float32")
    expected = probes.predicted(model, x)
    step = probes.inference_step(model)

    def no_predict(*args, **kwargs):
        raise AssertionError("the inference step ran predict and its data pipeline")

    monkeypatch.setattr(type(model), "predict", no_predict)
    for _ in range(2):  # compiled once, called again
        np.testing.assert_allclose(keras.ops.convert_to_numpy(step(x)), expected, rtol=1e-5, atol=1e-6)
