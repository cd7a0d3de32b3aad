"""Models given as .keras paths, with Keras's safe_mode."""

import re

import keras
import pytest
from keras import layers

import bnseq
from bnseq.reading import files


def test_as_model_errors(tmp_path):
    with pytest.raises(TypeError, match="Expected a keras.Model or the path of a .keras file. Received: 3 "):
        files.as_model(3)
    with pytest.raises(FileNotFoundError, match="No such file: '.*missing.keras'"):
        files.as_model(tmp_path / "missing.keras")
    with pytest.raises(IsADirectoryError, match="is a directory, not a .keras file"):
        files.as_model(tmp_path)
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="is not a .keras file \\(a .keras file is a zip archive"):
        files.as_model(text)


def lambda_model():
    inputs = keras.Input((4,))
    x = layers.Dense(3, use_bias=False, name="d")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, layers.Lambda(lambda t: t * 2.0, name="double")(x))


@pytest.mark.parametrize(
    "function", [bnseq.lint, bnseq.fold_report, bnseq.fold, bnseq.fold_with_report, bnseq.batch_normalize]
)
def test_lambda_file_needs_safe_mode_false(tmp_path, function):
    path = tmp_path / "lambda.keras"
    lambda_model().save(path)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"'{path}' holds a Lambda layer, whose Python code Keras loads only outside safe "
            "mode. If you trust the file, pass safe_mode=False (on the command line: --unsafe)."
        ),
    ):
        function(path)
    result = function(path, safe_mode=False)
    assert result is not None
