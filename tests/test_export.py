"""bnseq.export: folded artifacts checked in ONNX Runtime, LiteRT, a SavedModel and Keras."""

import re
import sys

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import cli
from tests.test_fold import CASES
from tests.test_fold import _shape
from tests.test_fold import randomize_statistics

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="Keras exports ONNX, LiteRT and SavedModel from TensorFlow"
)
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")


def unit(case, data_format="channels_last"):
    make, shape = CASES[case]
    layer = make(data_format)
    shape = shape if case.startswith("dense") else _shape(shape, data_format)
    model = bnseq.Sequential([keras.Input(shape), layer, layers.Activation("relu")], batch_norm=True)
    # bnseq.Sequential normalizes the linear layer: layer, BatchNormalization, ReLU (from the Activation).
    return randomize_statistics(model)


def onnx_ops(path):
    return [node.op_type for node in onnx.load(path).graph.node]


GROUPS = pytest.mark.xfail(
    strict=True,
    reason="Keras runs a grouped Conv2D through an XLA-compiled function (a StatefulPartitionedCall), which "
    "tf2onnx 1.17 leaves unconverted and ONNX Runtime rejects: with or without folding",
)


@pytest.mark.parametrize("case", [pytest.param(case, marks=GROUPS) if case == "conv2d_groups" else case
                                  for case in sorted(CASES)])
def test_onnx_every_linear_kind(case, tmp_path):
    model = unit(case)
    report = bnseq.export(model, tmp_path / "m.onnx")
    assert (report.format, report.folded, report.kept) == ("onnx", 1, 0)
    assert report.max_rel <= 1e-4
    ops = onnx_ops(str(tmp_path / "m.onnx"))
    assert "BatchNormalization" not in ops and "Mul" not in ops, ops


@pytest.mark.parametrize("case", sorted(CASES))
def test_litert_every_linear_kind(case, tmp_path):
    model = unit(case)
    report = bnseq.export(model, tmp_path / "m.tflite")
    assert (report.format, report.folded) == ("litert", 1)
    assert report.max_rel <= 1e-4


@pytest.mark.parametrize("case", ["conv2d", "conv2d_transpose", "conv1d", "depthwise2d_m1"])
def test_onnx_channels_first(case, tmp_path):
    """ONNX is channels_first itself; on any CPU (tf2onnx converts the graph, it runs no NCHW kernel)."""
    report = bnseq.export(unit(case, "channels_first"), tmp_path / "m.onnx")
    assert report.max_rel <= 1e-4


def test_litert_channels_first_where_the_converter_can(tmp_path):
    report = bnseq.export(unit("depthwise2d_m1", "channels_first"), tmp_path / "m.tflite")
    assert report.max_rel <= 1e-4
    # A channels_first Conv2DTranspose needs TensorFlow ops the LiteRT interpreter lacks: a clear error.
    with pytest.raises(ValueError, match=re.escape("The litert runtime cannot run")):
        bnseq.export(unit("conv2d_transpose", "channels_first"), tmp_path / "t.tflite")


def test_nested_and_functional_models(tmp_path):
    inner = bnseq.Sequential([keras.Input((6,)), layers.Dense(4, activation="relu")], batch_norm=True, name="inner")
    inputs = keras.Input((5,))
    a = layers.BatchNormalization()(layers.Dense(6, use_bias=False)(inputs))
    b = layers.BatchNormalization()(layers.Dense(6, use_bias=False)(inputs))
    model = randomize_statistics(keras.Model(inputs, inner(layers.Add()([a, b]))))
    for suffix in ("onnx", "tflite"):
        report = bnseq.export(model, tmp_path / f"m.{suffix}")
        assert report.folded == 3 and report.max_rel <= 1e-4
    assert "BatchNormalization" not in onnx_ops(str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("suffix", ["onnx", "tflite"])
@pytest.mark.parametrize("name", ["MobileNetV2", pytest.param("ResNet50", marks=pytest.mark.slow)])
def test_keras_applications(name, suffix, tmp_path):
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=4,
                                              classifier_activation=None)
    randomize_statistics(model, np.random.default_rng(1))
    report = bnseq.export(model, tmp_path / f"m.{suffix}")
    batch_norms = sum(isinstance(layer, layers.BatchNormalization) for layer in model.layers)
    assert report.kept == 0 and report.folded == batch_norms
    assert report.max_rel <= 1e-4
    if suffix == "onnx":
        assert "BatchNormalization" not in onnx_ops(str(tmp_path / "m.onnx"))


def test_saved_model_and_keras_and_the_report(tmp_path):
    model = unit("conv2d")
    saved = bnseq.export(model, tmp_path / "saved")
    assert saved.format == "tf_saved_model" and saved.max_rel <= 1e-4
    report = bnseq.export(model, tmp_path / "m.keras", compare=True)
    assert report.unfolded_latency is not None
    lines = str(report).splitlines()
    assert lines[0] == f"keras {tmp_path / 'm.keras'} ({report.size:,} bytes)"
    assert lines[1] == "BatchNormalization: 1 folded, 0 kept"
    assert lines[3].startswith("latency: ") and "folded/unfolded" in lines[3]


def test_no_fold_keeps_the_batch_norm(tmp_path):
    report = bnseq.export(unit("dense"), tmp_path / "m.onnx", fold=False)
    assert (report.folded, report.kept) == (0, 1) and report.max_rel <= 1e-4


def test_tolerance_error_holds_the_report_and_keeps_the_artifact_aside(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"the user's earlier export")
    with pytest.raises(bnseq.ToleranceError) as error:
        bnseq.export(unit("dense"), tmp_path / "m.onnx", rtol=0.0, sample=np.full((2, 5), 1e3, "float32"))
    kept = str(tmp_path / "m.failed-check.onnx")
    assert error.value.report.path == kept and error.value.report.rtol == 0.0
    assert str(error.value).startswith(f"The onnx export of '{tmp_path / 'm.onnx'}' differs from the model by ")
    assert "Export with fold=False (on the command line --no-fold): if that passes, the fold is the cause" in str(
        error.value
    )
    assert str(error.value).endswith(f"The artifact is kept as '{kept}'; '{tmp_path / 'm.onnx'}' was not written.")
    assert (tmp_path / "m.onnx").read_bytes() == b"the user's earlier export"
    assert onnx_ops(kept)  # a whole ONNX model, for inspection
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.failed-check.onnx", "m.onnx"]


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=re.escape("Cannot tell the export format from the suffix '.bin'")):
        bnseq.export(unit("dense"), tmp_path / "m.bin")
    # A channels_first Conv1D fails in the LiteRT converter: the error names the target, not the temporary file.
    with pytest.raises(ValueError, match=re.escape(f"Keras's litert exporter cannot write '{tmp_path / 'c.tflite'}'")):
        bnseq.export(unit("conv1d", "channels_first"), tmp_path / "c.tflite")
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    with pytest.raises(ValueError, match=re.escape("Unknown export format. Use one of keras, litert, onnx, "
                                                   "tf_saved_model. Received: format='tflite'")):
        bnseq.export(unit("dense"), tmp_path / "m.x", format="tflite")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError) as error:
        bnseq.export(unit("dense"), tmp_path / "m.onnx")
    assert str(error.value) == (
        "Exporting to onnx and checking it needs the 'onnxruntime' package, which is not installed. Install "
        "bnseq's onnx extra: pip install 'bnseq[onnx]' (from a clone: pip install '.[onnx]')."
    )


def test_cli_exit_codes(tmp_path, capsys, monkeypatch):
    unit("dense").save(tmp_path / "in.keras")
    assert cli.main(["export", str(tmp_path / "in.keras"), str(tmp_path / "out.onnx")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "BatchNormalization: 1 folded, 0 kept"
    assert cli.main(["export", str(tmp_path / "missing.keras"), str(tmp_path / "out.onnx")]) == 2
    assert capsys.readouterr().err == f"bnseq: error: No such file: '{tmp_path / 'missing.keras'}'\n"
    np.save(tmp_path / "big.npy", np.full((2, 5), 1e3, "float32"))
    assert cli.main(["export", str(tmp_path / "in.keras"), str(tmp_path / "tight.onnx"), "--rtol", "0",
                     "--sample", str(tmp_path / "big.npy")]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith(f"onnx {tmp_path / 'tight.failed-check.onnx'} (")
    assert err.startswith(f"bnseq: The onnx export of '{tmp_path / 'tight.onnx'}' differs from the model by ")
    assert not (tmp_path / "tight.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.main(["export", str(tmp_path / "in.keras"), str(tmp_path / "out2.onnx")]) == 2
    assert "Install bnseq's onnx extra" in capsys.readouterr().err


# The check, right for any model: inputs and outputs by name, in every format.


def two_inputs_three_outputs(dict_inputs=False, dict_outputs=False):
    """Inputs named against their order ('b' first, then 'a'), of different shapes; three outputs."""
    b, a = keras.Input((3,), name="b"), keras.Input((5,), name="a")
    x = layers.Concatenate()([layers.BatchNormalization()(layers.Dense(4, use_bias=False)(each)) for each in (b, a)])
    x = layers.Activation("relu")(x)
    outputs = [layers.Dense(size, name=f"head{size}")(x) for size in (2, 3, 1)]
    if dict_outputs:
        outputs = dict(zip(["z", "y", "m"], outputs))  # not in sorted order
    # Keys that are the names, not in sorted order (Keras warns when dict keys and input names differ).
    inputs = {"b": b, "a": a} if dict_inputs else [b, a]
    return randomize_statistics(keras.Model(inputs, outputs))


@pytest.mark.parametrize("suffix", [".onnx", ".tflite", "", ".keras"])
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_inputs_and_outputs_are_matched_by_name(kind, suffix, tmp_path):
    model = two_inputs_three_outputs(dict_inputs=kind == "dict", dict_outputs=kind == "dict")
    rng = np.random.default_rng(3)
    b, a = rng.normal(size=(4, 3)), rng.normal(size=(4, 5))  # float64, as NumPy makes them
    samples = [{"a": a, "b": b}, {"b": b, "a": a}] if kind == "dict" else [[b, a], {"a": a, "b": b}]
    for index, sample in enumerate(samples):
        report = bnseq.export(model, tmp_path / f"m{index}{suffix}", sample=sample)
        assert report.folded == 2 and report.max_rel <= 1e-5, report
    # Nothing but the artifacts: no partial files left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"m0{suffix}", f"m1{suffix}"]


def test_the_check_catches_a_swapped_input(tmp_path, monkeypatch):
    """Were inputs paired wrongly, the check must fail: pair them in reverse and see it refuse."""
    from bnseq.exporting import checking

    b = keras.Input((4,), name="b")
    a = keras.Input((4,), name="a")
    model = keras.Model([b, a], layers.Dense(3)(layers.Concatenate()([layers.Dense(2)(b), a])))
    reversed_names = checking.matched_inputs

    def swapped(names, available, chosen):
        matched = reversed_names(names, available, chosen)
        return dict(zip(matched, reversed(list(matched.values()))))

    monkeypatch.setattr(checking, "matched_inputs", swapped)
    with pytest.raises(bnseq.ToleranceError):
        bnseq.export(model, tmp_path / "m.tflite")


def test_an_output_named_like_an_input_is_refused_before_writing(tmp_path):
    a = keras.Input((3,), name="a")
    model = keras.Model(a, {"a": layers.Dense(2)(a)})
    with pytest.raises(ValueError, match="an output and an input both named 'a', which Keras's ONNX exporter"):
        bnseq.export(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    assert bnseq.export(model, tmp_path / "m.tflite").max_rel <= 1e-6  # LiteRT has no such trouble


def test_sample_errors_name_the_input(tmp_path):
    model = two_inputs_three_outputs()
    with pytest.raises(ValueError, match=re.escape("The sample for input 'a' has shape (2, 4); the model takes "
                                                   "(batch, 5).")):
        bnseq.export(model, tmp_path / "m.onnx", sample={"a": np.zeros((2, 4)), "b": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=re.escape("keyed by the input's name: 'b', 'a'. Received keys: 'x'")):
        bnseq.export(model, tmp_path / "m.onnx", sample={"x": np.zeros((2, 4))})
    with pytest.raises(ValueError, match=re.escape("The model takes 2 inputs (b, a); the sample has 1.")):
        bnseq.export(model, tmp_path / "m.onnx", sample=np.zeros((2, 3)))
    assert list(tmp_path.iterdir()) == []


def test_mixed_float16_exports_with_the_defaults(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = bnseq.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(8, 3, activation="relu"),
                                  layers.Conv2D(8, 3, activation="relu"), layers.GlobalAveragePooling2D(),
                                  layers.Dense(4, dtype="float32")], batch_norm=True)
    finally:
        keras.config.set_dtype_policy("float32")
    randomize_statistics(model)
    for suffix in ("onnx", ""):
        report = bnseq.export(model, tmp_path / f"m.{suffix}" if suffix else tmp_path / "saved")
        assert report.rtol == 1e-2 and report.max_rel <= 1e-2 and report.folded == 3
    # Keras writes float16 layers as TensorFlow (Flex) ops, which the LiteRT interpreter lacks: said so.
    with pytest.raises(ValueError, match="The model computes in float16, which Keras's LiteRT export writes as "
                                         "TensorFlow ops that the LiteRT interpreter lacks"):
        bnseq.export(model, tmp_path / "m.tflite")
    with pytest.raises(bnseq.ToleranceError, match="The model computes in float16, whose rounding"):
        bnseq.export(model, tmp_path / "tight.onnx", rtol=1e-9)


def test_keras_export_of_a_lambda_honours_safe_mode(tmp_path):
    model = bnseq.Sequential([keras.Input((3,)), layers.Dense(4), layers.Lambda(lambda x: x * 2.0)],
                             batch_norm=True)
    model.save(tmp_path / "in.keras")
    with pytest.raises(ValueError, match="holds a Lambda layer"):
        bnseq.export(tmp_path / "in.keras", tmp_path / "out.keras")
    report = bnseq.export(tmp_path / "in.keras", tmp_path / "out.keras", safe_mode=False)
    assert report.folded == 1 and report.max_rel <= 1e-6
    report = bnseq.export(model, tmp_path / "out2.keras", safe_mode=False)  # the check's own load
    assert report.max_rel <= 1e-6
    with pytest.raises(ValueError, match=re.escape("The keras runtime cannot run the export")):
        bnseq.export(model, tmp_path / "out3.keras")  # safe mode: the check cannot load the Lambda
    assert not (tmp_path / "out3.keras").exists() and (tmp_path / "out3.failed-check.keras").exists()


def test_a_constant_output_makes_a_weak_check(tmp_path):
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(3), layers.Activation("relu")], batch_norm=True)
    bn = model.layers[1]
    bn.gamma.assign(np.zeros(3))
    bn.beta.assign(-np.ones(3))  # ReLU of -1 everywhere: all zeros, whatever the input
    with pytest.warns(UserWarning, match="is weak: the model's outputs on the sample are all zero"):
        report = bnseq.export(model, tmp_path / "m.onnx")
    assert report.weak.startswith("the model's outputs on the sample are all zero. Pass sample= with real inputs")
    assert str(report).splitlines()[-1].startswith("weak check: ")
    bn.beta.assign(np.ones(3))  # constant, not zero
    with pytest.warns(UserWarning, match="the same outputs for every example"):
        bnseq.export(model, tmp_path / "m2.onnx")
    bn.gamma.assign(np.ones(3))
    assert bnseq.export(model, tmp_path / "m3.onnx").weak is None


def test_never_destroys_the_source_and_creates_folders(tmp_path):
    model = unit("dense")
    model.save(tmp_path / "in.keras")
    before = (tmp_path / "in.keras").read_bytes()
    with pytest.raises(ValueError, match="Refusing to export over the model's own file"):
        bnseq.export(tmp_path / "in.keras", tmp_path / "in.keras")
    assert (tmp_path / "in.keras").read_bytes() == before
    for name in ("deep/er/m.keras", "deep/er/m.onnx", "deep/er/m.tflite", "deep/er/saved"):
        assert bnseq.export(model, tmp_path / name).max_rel <= 1e-4
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=re.escape("The SavedModel directory '") + ".*is not empty"):
        bnseq.export(model, tmp_path / "used")
    assert [path.name for path in (tmp_path / "used").iterdir()] == ["notes.txt"]
    bnseq.export(model, tmp_path / "used", overwrite=True)
    assert (tmp_path / "used" / "saved_model.pb").exists() and not (tmp_path / "used" / "notes.txt").exists()
    (tmp_path / "empty").mkdir()
    assert bnseq.export(model, tmp_path / "empty").format == "tf_saved_model"
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ValueError, match="is a directory; a onnx export is a file"):
        bnseq.export(model, tmp_path / "folder.onnx")


def test_cli_refuses_to_overwrite_its_input(tmp_path, capsys):
    unit("dense").save(tmp_path / "m.keras")
    before = (tmp_path / "m.keras").read_bytes()
    for command in ("fold", "export"):
        assert cli.main([command, str(tmp_path / "m.keras"), str(tmp_path / "m.keras")]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"bnseq: error: the output '{tmp_path / 'm.keras'}' is the input file; {command} writes an "
            "inference-only model and would replace the trainable one. Choose another output path.\n"
        )
        assert (tmp_path / "m.keras").read_bytes() == before
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "old.txt").write_text("")
    assert cli.main(["export", str(tmp_path / "m.keras"), str(tmp_path / "saved")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "m.keras"), str(tmp_path / "saved"), "--overwrite"]) == 0
    assert (tmp_path / "saved" / "saved_model.pb").exists()


def test_cli_sample_npz_by_name_and_clear_shape_errors(tmp_path, capsys):
    two_inputs_three_outputs().save(tmp_path / "two.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "sample.npz", a=rng.normal(size=(3, 5)), b=rng.normal(size=(3, 3)))
    assert cli.main(["export", str(tmp_path / "two.keras"), str(tmp_path / "two.tflite"),
                     "--sample", str(tmp_path / "sample.npz")]) == 0
    assert "relative" in capsys.readouterr().out
    np.save(tmp_path / "wrong.npy", np.zeros((2, 7), "float32"))
    unit("dense").save(tmp_path / "one.keras")
    assert cli.main(["export", str(tmp_path / "one.keras"), str(tmp_path / "one.onnx"),
                     "--sample", str(tmp_path / "wrong.npy")]) == 2
    assert capsys.readouterr().err.endswith("has shape (2, 7); the model takes (batch, 5).\n")


# int8: a digits-trained convnet, folded and quantized, checked against the float model.


@pytest.fixture(scope="module")
def digits_convnet():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    keras.utils.set_random_seed(0)
    model = bnseq.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2DTranspose(32, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ],
        batch_norm=True,
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x[:1400], y[:1400], epochs=4, batch_size=32, verbose=0)
    return model, x[1400:], y[1400:]


def test_int8_agrees_with_the_float_model(digits_convnet, tmp_path):
    model, x, y = digits_convnet
    weights = [keras.ops.convert_to_numpy(each) for each in model.weights]
    report = bnseq.export(model, tmp_path / "m.tflite", quantize="int8", data=x, recalibrate=True)
    quantization = report.quantization
    assert (report.folded, report.kept) == (4, 0)
    assert quantization.kind == "int8" and quantization.examples == len(x) and quantization.recalibrated
    assert quantization.agreement >= 0.97
    assert report.size <= 0.35 * quantization.float_size
    # The model keeps its own statistics (recalibrate=True worked on them and put them back).
    assert all(np.array_equal(a, keras.ops.convert_to_numpy(b)) for a, b in zip(weights, model.weights))
    # Independently of bnseq's runner: the interpreter's own int8 tensors, quantized by hand.
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tmp_path / "m.tflite")).get_signature_runner()
    (detail,) = runner.get_input_details().values()
    (name, out), = runner.get_output_details().items()
    assert detail["dtype"] == np.int8 and out["dtype"] == np.int8
    scale, zero = detail["quantization"]
    (key,) = runner.get_input_details()
    logits = runner(**{key: np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)})[name]
    accuracy = float(np.mean(np.argmax(logits, -1) == y))
    float_accuracy = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
    assert accuracy >= float_accuracy - 0.03, (accuracy, float_accuracy)
    lines = str(report).splitlines()
    assert lines[0].startswith(f"litert int8 {tmp_path / 'm.tflite'} (")
    assert lines[4].startswith("against the float model: top-1 agreement ")
    assert lines[5].startswith("float export: ")


def test_int8_failures_and_float16(digits_convnet, tmp_path, capsys):
    model, x, _ = digits_convnet
    with pytest.raises(bnseq.ToleranceError, match=r"agrees with the float model on the top-1 class of .* less "
                                                    r"than min_agreement=1.01"):
        bnseq.export(model, tmp_path / "m.tflite", quantize="int8", data=x[:50], min_agreement=1.01)
    assert (tmp_path / "m.failed-check.tflite").exists() and not (tmp_path / "m.tflite").exists()
    with pytest.raises(ValueError, match=re.escape("quantize='int8' needs data=")):
        bnseq.export(model, tmp_path / "m.tflite", quantize="int8")
    with pytest.raises(ValueError, match=re.escape("quantize= is for LiteRT exports (.tflite); this export is onnx")):
        bnseq.export(model, tmp_path / "m.onnx", quantize="int8", data=x)
    report = bnseq.export(model, tmp_path / "h.tflite", quantize="float16", data=x)
    assert report.quantization.agreement >= 0.99 and report.size < 0.6 * report.quantization.float_size
    # An operation with no int8 kernel: refused, naming the layer.
    erf = bnseq.Sequential([keras.Input((4,)), layers.Dense(8, name="wide"), layers.Lambda(keras.ops.erf, name="odd")],
                           batch_norm=True)
    with pytest.raises(ValueError, match=re.escape("cannot quantize this model to int8: an operation (tf.Erf) in "
                                                   "layer odd has no int8 kernel")):
        bnseq.export(erf, tmp_path / "g.tflite", quantize="int8", data=np.random.default_rng(0).normal(
            size=(20, 4)).astype("float32"))
    # The command line.
    model.save(tmp_path / "digits.keras")
    np.save(tmp_path / "data.npy", x)
    assert cli.main(["export", str(tmp_path / "digits.keras"), str(tmp_path / "cli.tflite"), "--quantize", "int8",
                     "--data", str(tmp_path / "data.npy")]) == 0
    assert "top-1 agreement" in capsys.readouterr().out


def test_litert_keeps_nothing_of_batch_normalization_in_the_foldable_placements():
    """Issue 31: after bnseq.fold, LiteRT holds no float MUL/ADD left of BN beyond the bare layers' own bias adds."""
    from benchmarks import litert_placements

    names = ["after Conv3D", "after Dense on a sequence", "after MaxPooling2D", "after AveragePooling2D",
             "on the model input", "after an activation, nothing after"]
    rows = {row[0]: row for row in litert_placements.measure(names)}
    for name in names[:-1]:
        placement, as_it_is, folded, bare, left, fold, _ = rows[name]
        assert fold == "folded" and as_it_is > folded and left == 0, rows[name]
    assert rows[names[-1]][5] == "kept" and rows[names[-1]][4] == 2  # reported, and MUL + ADD stay
