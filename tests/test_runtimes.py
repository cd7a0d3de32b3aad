"""`bnseq.exporting.runtimes`: artifacts loaded in their runtimes, int8 tensors fed and read, operators listed."""

import keras
import numpy as np
import pytest
from keras import layers

from bnseq.exporting import runtimes


def test_int8_tensors_are_fed_and_read_with_their_own_scale_and_zero_point():
    detail = {"dtype": np.int8, "quantization": (0.5, -3)}
    fed = runtimes._quantized(np.array([0.0, 1.0, 100.0, -100.0], "float32"), detail)
    assert fed.dtype == np.int8 and fed.tolist() == [-3, -1, 127, -128]  # rounded, then clipped to int8
    assert runtimes._dequantized(fed, detail).tolist() == [0.0, 1.0, 65.0, -62.5]
    float_detail = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert runtimes._quantized(np.array([0.25]), float_detail).dtype == np.float32


def test_interleaved_latency_times_every_run():
    calls = {"a": 0, "b": 0}

    def counted(name):
        def run():
            calls[name] += 1
        return run

    latencies = runtimes.interleaved_latency([counted("a"), counted("b")], rounds=3, calls=2)
    assert len(latencies) == 2 and all(value >= 0 for value in latencies) and calls == {"a": 6, "b": 6}


def test_a_missing_runtime_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(runtimes.EXTRAS, "litert", ("litert", ["no_such_module_here"]))
    with pytest.raises(ImportError, match=r"pip install 'bnseq\[litert\]'"):
        runtimes.runtime("litert")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="LiteRT exports go through TensorFlow")
def test_operators_and_output_scales_of_a_litert_file(tmp_path):
    pytest.importorskip("ai_edge_litert")
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, layers.Dense(3, name="d")(layers.Dense(5, activation="relu")(inputs)))
    path = str(tmp_path / "m.tflite")
    runtimes.write(model, path, "litert")
    operators = runtimes._operators(path)
    assert [name for name, _, _ in operators if name != "DELEGATE"] == ["FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert runtimes.float_operators(path) == ["FULLY_CONNECTED", "FULLY_CONNECTED"]  # a float model
    assert runtimes.output_scales(path) == [("output_0", 0.0)]
    run = runtimes.run_litert(path, ["x"], 1)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    ((name, values),) = run([x])
    np.testing.assert_allclose(values, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_a_keras_artifact_is_timed_on_its_inference_and_checked_under_predict(tmp_path, monkeypatch):
    """`.keras` latency is Keras's compiled inference step, the same outputs as the check's `predict`."""
    model = keras.Sequential([keras.Input((3,), name="x"), layers.Dense(2)])
    path = str(tmp_path / "m.keras")
    model.save(path)
    run = runtimes.run_keras(path, ["x"], None)
    flat = [np.random.default_rng(0).normal(size=(4, 3)).astype("float32")]
    ((_, checked),) = run(flat)
    monkeypatch.setattr(keras.Model, "predict", lambda *args, **kwargs: pytest.fail("timed with predict"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(runtimes.timed(run)(flat)), checked, rtol=1e-6)

    def onnx_like(flat):
        return flat

    assert runtimes.timed(onnx_like) is onnx_like  # the other runtimes are timed as they are run
