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
@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
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


def test_tolerance_error_holds_the_report(tmp_path):
    with pytest.raises(bnseq.ToleranceError) as error:
        bnseq.export(unit("dense"), tmp_path / "m.onnx", rtol=0.0, sample=np.full((2, 5), 1e3, "float32"))
    assert error.value.report.path == str(tmp_path / "m.onnx")
    assert str(error.value).startswith(f"The onnx export '{tmp_path / 'm.onnx'}' differs from the model by ")


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=re.escape("Cannot tell the export format from the suffix '.bin'")):
        bnseq.export(unit("dense"), tmp_path / "m.bin")
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
    assert out.splitlines()[0].startswith(f"onnx {tmp_path / 'tight.onnx'} (")
    assert err.startswith(f"bnseq: The onnx export '{tmp_path / 'tight.onnx'}' differs from the model by ")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.main(["export", str(tmp_path / "in.keras"), str(tmp_path / "out2.onnx")]) == 2
    assert "Install bnseq's onnx extra" in capsys.readouterr().err
