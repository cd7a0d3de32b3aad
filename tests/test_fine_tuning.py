"""Lint's fine-tuning rules (BN005-BN008) reported exactly where `fit` does what the user did not mean,
and `bnseq.summary` (with its CLI): one row per BatchNormalization, its mode under fit, its fold, its findings.

Each BN005/BN006 test measures what `fit` does on this backend next to what lint says, so a rule that
fires where Keras behaves, or keeps quiet where it does not, fails here. `.ci/run` runs this module on
TensorFlow, JAX and PyTorch and on the oldest Keras.
"""

import json

import keras
import numpy as np
import pytest

import bnseq
from bnseq import cli
from bnseq import probes
from tests.test_freeze import Block
from tests.test_freeze import batch_norm_of
from tests.test_freeze import compiled
from tests.test_freeze import fit
from tests.test_freeze import moved
from tests.test_freeze import pretrained
from tests.test_freeze import values

BACKEND = keras.backend.backend()


def codes(model, **options):
    return [(finding.code, finding.layer) for finding in bnseq.lint(model, **options)]


# BN005 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("way", ["guide", "direct"])
def test_bn005_where_this_keras_overrides_a_recorded_training_false(way):
    model = pretrained(way)
    overridden = probes.recorded_training_is_overridden(nested=way == "guide")
    found = codes(model)
    assert found == ([("BN005", "bn")] if overridden else [])
    compiled(model)
    before = values(model)
    fit(model)
    statistics, _ = moved(model, before, names=("moving_mean", "moving_variance"))
    assert (statistics > 0.0) == overridden  # the finding is what fit did
    if overridden:
        (finding,) = bnseq.lint(pretrained(way))
        assert keras.__version__ in finding.message and "keras-team/keras#20285" in finding.message
        by = "base" if way == "guide" else "bn"
        assert f"bnseq.freeze(model, layers=['{by}'])" in finding.message


@pytest.mark.parametrize("way", ["guide", "direct"])
def test_bn005_follows_the_probe_not_a_version_number(way, monkeypatch):
    """On a Keras that keeps the recorded training=False (keras-team/keras PR #23364), nothing to report."""
    monkeypatch.setattr(probes, "recorded_training_is_overridden", lambda nested=False: False)
    model = pretrained(way)
    assert codes(model) == []
    (row,) = bnseq.summary(model)
    assert row.under_fit.startswith("inference:") and "training=False" in row.under_fit
    assert not row.trains_statistics


def test_bn005_goes_away_once_frozen_and_inside_a_subclassed_block_reports_nothing():
    model = pretrained("guide")
    bnseq.freeze(model)
    assert codes(model) == []
    assert codes(pretrained("subclassed")) == []  # a traced block's mode is the caller's: no recorded value


def test_bn005_through_a_block_called_with_training_false():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(Block(name="block")(inputs, training=False))
    model = keras.Model(inputs, outputs)
    expected = [("BN005", "block_bn")] if probes.recorded_training_is_overridden(nested=True) else []
    assert codes(model) == expected


# BN006 ---------------------------------------------------------------------------------------------


def test_bn006_trainable_changed_after_fit_compiled_the_step():
    model = compiled(pretrained("plain"))
    fit(model)
    batch_norm_of(model).trainable = False
    found = codes(model)
    pitfall = BACKEND in ("tensorflow", "jax")  # measured below: TF still trains it, JAX raises
    assert found == ([("BN006", "bn")] if pitfall else [])
    before = values(model)
    if BACKEND == "jax":
        assert "raises" in bnseq.lint(model)[0].message
        with pytest.raises(ValueError, match="optimizer"):
            fit(model)
        return
    fit(model)
    statistics, _ = moved(model, before, names=("moving_mean", "moving_variance"))
    assert (statistics > 0.0) == pitfall


def test_no_bn006_before_the_first_fit_or_after_bnseq_freeze():
    model = compiled(pretrained("plain"))
    batch_norm_of(model).trainable = False  # before the first fit: every backend sees it
    assert codes(model) == []
    model = compiled(pretrained("plain"))
    fit(model)
    bnseq.freeze(model)
    assert codes(model) == []
    summary = bnseq.summary(model)
    assert summary[0].under_fit == "frozen (trainable=False)"


# BN007 ---------------------------------------------------------------------------------------------


def test_bn007_batch_norm_training_inside_a_backbone_frozen_otherwise():
    model = pretrained("guide")
    base = model.get_layer("base")
    for layer in base.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    found = [code for code, _ in codes(model)]
    assert "BN007" in found
    (finding,) = [each for each in bnseq.lint(model) if each.code == "BN007"]
    assert "Functional 'base'" in finding.message and "layers=['base']" in finding.message
    bnseq.freeze(model, layers=["base"])
    assert codes(model) == []


def test_bn007_a_batch_norm_set_trainable_inside_a_frozen_backbone():
    model = pretrained("guide")
    base = model.get_layer("base")
    base.trainable = False
    base.get_layer("bn").trainable = True  # trains statistics: Keras checks the layer's own flag
    assert ("BN007", "bn") in codes(model)
    (row,) = bnseq.summary(model)
    assert row.trains_statistics and "inside 'base' (trainable=False)" in row.under_fit


# BN008 ---------------------------------------------------------------------------------------------


def test_bn008_small_batches_for_layers_that_train_statistics():
    model = pretrained("plain")
    assert codes(model, batch_size=4) == [("BN008", "bn")]
    assert codes(model, batch_size=8) == []
    bnseq.freeze(model)
    assert codes(model, batch_size=4) == []  # frozen: the batch size does not reach its statistics
    inputs = keras.Input((4,), batch_size=2)
    features = keras.layers.Dense(3, use_bias=False)(inputs)
    fixed = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(features))
    assert codes(fixed) == [("BN008", "bn")]
    with pytest.raises(ValueError, match="positive integer"):
        bnseq.lint(model, batch_size=0)


# summary -------------------------------------------------------------------------------------------


def test_summary_rows_modes_folds_and_findings():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.BatchNormalization(name="late"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, use_bias=False, name="dense"),
            keras.layers.BatchNormalization(name="held"),
        ],
        name="net",
    )
    bnseq.freeze(model, layers="held", affine=False)
    rows = list(bnseq.summary(model))
    assert [(row.path, row.axis, row.fold, row.findings) for row in rows] == [
        ("net/bn", -1, "into conv", ("BN001",)),
        ("net/late", -1, "forward into dense, across Flatten 'flatten'", ("BN002",)),
        ("net/held", -1, "into dense", ()),
    ]
    assert [row.under_fit for row in rows] == [
        "trains statistics",
        "trains statistics",
        "statistics frozen, gamma and beta train (bnseq.freeze)",
    ]
    assert [row.trains_statistics for row in rows] == [True, True, False]


def test_summary_table_is_aligned_and_reaches_inside_traced_blocks():
    model = pretrained("subclassed")
    table = bnseq.summary(model)
    text = str(table)
    lines = text.splitlines()
    assert lines[0] == 'BatchNormalization in model "model"'
    header = lines[2]
    row = lines[4]
    assert row.startswith("model/block/block_bn")
    cells = {"axis": "-1", "under fit": "trains statistics", "fold": "into block_dense"}
    for column, cell in cells.items():  # every cell starts under its column's heading
        assert row.index(cell, len("model/block/block_bn")) == header.index(column)
    assert row.rindex("-") == header.index("lint")
    assert lines[-1] == "BatchNormalization: 1; training statistics in fit: 1; folding: 1; lint findings: 0"


def test_summary_of_a_file_and_the_cli(tmp_path, capsys):
    path = tmp_path / "guide.keras"
    pretrained("guide").save(path)
    rows = bnseq.summary(str(path))
    assert [row.path for row in rows] == ["model/base/bn"]
    assert cli.main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == 'BatchNormalization in model "model"' and "model/base/bn" in out
    assert cli.main(["summary", "--format", "json", "--batch-size", "4", str(path)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["path"] == "model/base/bn" and "BN008" in row["findings"]
    assert cli.main(["summary", str(tmp_path / "missing.keras")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_summary_and_lint_change_nothing():
    model = compiled(pretrained("guide"))
    fit(model)
    before = values(model)
    function = model.train_function
    bnseq.summary(model, batch_size=2)
    bnseq.lint(model, batch_size=2)
    after = values(model)
    assert all(np.array_equal(after[path], value) for path, value in before.items())
    assert model.train_function is function


# The zoo: no fine-tuning finding where nothing was frozen or compiled ------------------------------

ZOO = [
    "ConvNeXtTiny", "DenseNet121", "DenseNet169", "DenseNet201", "EfficientNetB0", "EfficientNetB1",
    "EfficientNetB2", "EfficientNetB3", "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2",
    "EfficientNetV2B3", "EfficientNetV2S", "InceptionResNetV2", "InceptionV3", "MobileNet", "MobileNetV2",
    "MobileNetV3Small", "MobileNetV3Large", "NASNetMobile", "ResNet50", "ResNet101", "ResNet152",
    "ResNet50V2", "ResNet101V2", "ResNet152V2", "VGG16", "Xception", "EfficientNetB4",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_no_fine_tuning_false_alarm_on_the_zoo(name):
    size = 75 if name in ("InceptionResNetV2", "InceptionV3", "Xception") else 32
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    found = [finding.code for finding in bnseq.lint(model)]
    assert not set(found) & {"BN005", "BN006", "BN007", "BN008"}
    table = bnseq.summary(model)
    batch_norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(table) == len(batch_norms)
    assert all(row.under_fit == "trains statistics" for row in table)
    compiled(model)
    bnseq.freeze(model)
    assert all(row.under_fit == "frozen (trainable=False)" for row in bnseq.summary(model))
