"""bnseq.BatchNormalization: the axis it works out, its warnings, saving, and the rest of bnseq."""

import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import kinds
from bnseq.probes import infer
from tests.strategies import KINDS


def linear_cases():
    for rank, classes in KINDS.items():
        for kind in classes:
            for data_format in ("channels_last", "channels_first"):
                yield pytest.param(kind, rank, data_format, id=f"{kind.__name__}-{data_format}")
    yield pytest.param(layers.Dense, 0, None, id="Dense")


def make(kind, data_format):
    if kind is layers.Dense:
        return layers.Dense(3, use_bias=False)
    arguments = {"kernel_size": 2, "data_format": data_format, "use_bias": False}
    if "Depthwise" not in kind.__name__:
        arguments["filters"] = 3
    return kind(**arguments)


@pytest.mark.parametrize("kind, rank, data_format", list(linear_cases()))
def test_axis_is_what_bnseq_sequential_chooses(kind, rank, data_format):
    inputs = keras.Input((4,) * (rank + 1))
    linear = make(kind, data_format)
    bn = bnseq.BatchNormalization()
    bn(linear(inputs))
    model = bnseq.Sequential([keras.Input((4,) * (rank + 1)), make(kind, data_format)], batch_norm=True)
    assert bn.axis == model.layers[1].axis == kinds.channel_axis(linear)
    assert type(bn) is layers.BatchNormalization


@pytest.mark.parametrize(
    "stack, axis",
    [
        ([layers.Conv2D(4, 3, data_format="channels_first", use_bias=False), layers.ReLU()], 1),
        ([layers.Conv2D(4, 3, data_format="channels_first", use_bias=False), layers.Dropout(0.1)], 1),
        ([layers.Conv2D(4, 3, data_format="channels_first"), layers.MaxPooling2D(data_format="channels_first")], 1),
        ([layers.Conv2D(4, 3), layers.MaxPooling2D()], -1),
        ([layers.Conv2D(4, 3, data_format="channels_first"), layers.Flatten()], -1),
        ([layers.Conv2D(4, 3, data_format="channels_first"), layers.Reshape((4, 16))], 1),  # channels stay
        ([layers.Conv2D(4, 3), layers.Reshape((16, 4))], -1),
        ([layers.Conv2D(4, 3), layers.Permute((3, 1, 2))], 1),
    ],
    ids=["relu", "dropout", "pool_first", "pool_last", "flatten", "reshape_first", "reshape_last", "permute"],
)
def test_axis_after_layers_that_are_not_linear(stack, axis):
    x = inputs = keras.Input((3, 6, 6) if "first" in str(stack[0].data_format) else (6, 6, 3))
    for layer in stack:
        x = layer(x)
    bn = bnseq.BatchNormalization()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bnseq.BatchNormPlacementWarning)
        bn(x)
    assert bn.axis == axis
    keras.Model(inputs, bn.output)  # builds


def test_warnings_are_those_of_add():
    with pytest.warns(bnseq.BatchNormPlacementWarning) as ours:
        inputs = keras.Input((4,))
        bnseq.BatchNormalization(name="bn")(layers.Dense(3, activation="relu", name="d")(inputs))
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(3, activation="relu", name="d")])
    with pytest.warns(bnseq.BatchNormPlacementWarning) as theirs:
        model.add(layers.BatchNormalization(name="bn"))
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert [str(w.message)[:22] for w in ours] == ["Dense 'd' adds a bias ", "BatchNormalization 'bn"]
    assert all(w.filename == __file__ for w in ours)


def test_in_a_plain_bnseq_sequential_it_warns_once():
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        bnseq.Sequential([keras.Input((4,)), layers.Dense(3, name="d"), bnseq.BatchNormalization(name="bn")])
    assert [str(w.message) for w in record] == [
        "Dense 'd' adds a bias that BatchNormalization 'bn' subtracts again (3 parameters wasted). Write "
        "`Dense(..., use_bias=False)`, or let bnseq.Sequential(batch_norm=True) do it."
    ]


def test_concrete_tensors():
    bn = bnseq.BatchNormalization()
    bn(np.ones((2, 5), "float32"))
    assert bn.axis == -1
    bn = bnseq.BatchNormalization()
    bn(np.ones((2, 4, 4, 3), "float32"))  # channels_last by Keras's setting
    assert bn.axis == -1
    keras.config.set_image_data_format("channels_first")
    try:
        bn = bnseq.BatchNormalization()
        with pytest.raises(ValueError) as error:
            bn(np.ones((2, 3, 4, 4), "float32"))
    finally:
        keras.config.set_image_data_format("channels_last")
    assert str(error.value).startswith(
        "bnseq.BatchNormalization cannot tell the channel axis of its rank-4 input: it is a model input, and "
        "keras.config.image_data_format() is 'channels_first'"
    )
    assert "it does not guess. Pass `axis=` explicitly" in str(error.value)
    assert str(error.value).endswith("Received: input shape (2, 3, 4, 4)")
    assert bnseq.changing.layers.is_auto(bn)  # unchanged: it can still be called with a clear input


def test_explicit_axis_is_keras_own_layer():
    bn = bnseq.BatchNormalization(axis=1, momentum=0.5)
    assert type(bn) is layers.BatchNormalization and (bn.axis, bn.momentum) == (1, 0.5)


def model_with_auto_batch_norm():
    inputs = keras.Input((3, 7, 7))  # output (4, 5, 5): not the bias-add hazard shape
    x = layers.Conv2D(4, 3, use_bias=False, data_format="channels_first", name="c")(inputs)
    x = bnseq.BatchNormalization(momentum=0.8, name="bn")(x)
    return keras.Model(inputs, layers.Activation("relu", name="r")(x))


def test_saved_as_a_plain_batch_norm_that_loads_without_bnseq(tmp_path):
    model = model_with_auto_batch_norm()
    path = tmp_path / "auto.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.get_layer("bn")) is layers.BatchNormalization and restored.get_layer("bn").axis == 1
    script = (
        "import sys; sys.modules['bnseq'] = None\n"
        "import keras\n"
        f"model = keras.saving.load_model({str(path)!r})\n"
        "bn = model.get_layer('bn')\n"
        "print(type(bn).__module__, bn.axis, bn.momentum)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["keras.src.layers.normalization.batch_normalization", "1", "0.8"]


def test_lint_fold_and_batch_normalize_treat_it_as_batch_norm():
    model = model_with_auto_batch_norm()
    assert bnseq.lint(model) == []
    (decision,) = bnseq.fold_report(model)
    assert str(decision) == "bn: folded into c"
    fixed = bnseq.batch_normalize(model)
    kinds = [type(layer).__name__ for layer in fixed.layers]
    assert kinds == ["InputLayer", "Conv2D", "BatchNormalization", "Activation"]
    assert fixed.get_layer("bn").momentum == 0.8
    x = np.random.default_rng(0).normal(size=(2, 3, 7, 7)).astype("float32")
    folded = bnseq.fold(model)
    np.testing.assert_allclose(infer(folded, x), infer(model, x), rtol=1e-5, atol=1e-6)


def test_taken_over_in_batch_norm_mode_never_doubled():
    bn = bnseq.BatchNormalization(momentum=0.7, name="mine")
    model = bnseq.Sequential(
        [keras.Input((3, 6, 6)), layers.Conv2D(4, 3, data_format="channels_first", activation="relu"), bn],
        batch_norm=True,
    )
    assert [type(layer).__name__ for layer in model.layers] == ["Conv2D", "BatchNormalization", "Activation"]
    assert model.layers[1] is bn and (bn.axis, bn.momentum) == (1, 0.7)
    assert type(bn) is layers.BatchNormalization


def test_the_readme_three_routes_agree():
    """The seed's example, three ways: model-wide, per layer, the layer that reads its place."""
    def conv():
        return layers.Conv2D(8, (3, 3), data_format="channels_first")

    wide = bnseq.Sequential([keras.Input((3, 16, 16)), conv(), layers.Flatten(), layers.Dense(10)], batch_norm=True)
    wide.pop()
    wide.add(layers.Dense(10), batch_norm=False)
    per_layer = bnseq.Sequential([keras.Input((3, 16, 16))])
    per_layer.add(conv(), batch_norm=True)
    per_layer.add(layers.Flatten())
    per_layer.add(layers.Dense(10))
    inputs = keras.Input((3, 16, 16))
    x = layers.Conv2D(8, (3, 3), data_format="channels_first", use_bias=False)(inputs)
    x = layers.Flatten()(bnseq.BatchNormalization()(x))
    functional = keras.Model(inputs, layers.Dense(10)(x))
    for model in (wide, per_layer, functional):
        bn = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
        assert [layer.axis for layer in bn] == [1]
        assert bnseq.lint(model) == []
    with pytest.raises(ValueError, match=re.escape("cannot tell the channel axis")):
        keras.config.set_image_data_format("channels_first")
        try:
            bnseq.BatchNormalization()(np.ones((1, 3, 4, 4), "float32"))
        finally:
            keras.config.set_image_data_format("channels_last")


# The layout analysis: merges, Permute, Reshape, nested models; unknown raises ------------------------


def first_conv(name, filters=4):
    return layers.Conv2D(filters, 3, data_format="channels_first", use_bias=False, name=name)


@pytest.mark.parametrize("merge", [layers.Add, layers.Multiply, layers.Subtract, layers.Maximum,
                                   lambda: layers.Concatenate(axis=1)])
def test_after_a_merge_of_channels_first_convolutions(merge):
    inputs = keras.Input((3, 7, 7))
    merged = merge()([first_conv("a")(inputs), first_conv("b")(inputs)])
    bn = bnseq.BatchNormalization()
    bn(merged)
    assert bn.axis == 1 and bn.gamma.shape[0] == merged.shape[1]


def test_square_permute_moves_the_axis():
    inputs = keras.Input((5, 5))
    x = layers.Conv1D(5, 1, use_bias=False)(inputs)  # (batch, 5, 5): channels last
    bn = bnseq.BatchNormalization()
    bn(layers.Permute((2, 1))(x))
    assert bn.axis == 1  # the channels moved to axis 1, though the shape did not change


def test_through_nested_models():
    inner_inputs = keras.Input((3, 7, 7))
    inner = keras.Model(inner_inputs, layers.ReLU()(first_conv("c")(inner_inputs)), name="inner")
    inputs = keras.Input((3, 7, 7))
    bn = bnseq.BatchNormalization()
    bn(inner(inputs))
    assert bn.axis == 1
    sequential = keras.Sequential([keras.Input((3, 7, 7)), first_conv("s")], name="seq")
    bn = bnseq.BatchNormalization()
    bn(layers.Dropout(0.1)(sequential(inputs)))
    assert bn.axis == 1
    passthrough_inputs = keras.Input((4, 5, 5))
    passthrough = keras.Model(passthrough_inputs, layers.ReLU()(passthrough_inputs))  # reads its caller's
    bn = bnseq.BatchNormalization()
    bn(passthrough(first_conv("p")(keras.Input((3, 7, 7)))))
    assert bn.axis == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda x: layers.Add()([x, layers.Permute((2, 3, 1))(x)]),  # inputs disagree
        lambda x: layers.Lambda(lambda t: t * 2.0)(x),  # what a Lambda does is unknown
        lambda x: layers.Reshape((16, 4))(x),  # (4, 4, 4) read as (16, 4): the channels are lost
    ],
    ids=["disagreeing_merge", "lambda", "reshape_lost"],
)
def test_unknown_raises_and_never_guesses(make):
    x = make(first_conv("c", filters=4)(keras.Input((3, 6, 6))))  # (4, 4, 4)
    bn = bnseq.BatchNormalization()
    with pytest.raises(ValueError, match="it does not guess. Pass `axis=` explicitly"):
        bn(x)
    assert bnseq.changing.layers.is_auto(bn)


# An unsettled layer survives every round trip, and settles when first called ------------------------


def channels_first_stack(bn):
    return keras.Sequential([layers.Conv2D(4, 3, data_format="channels_first", use_bias=False), bn])


def settles_to_channels_first(bn):
    assert bnseq.changing.layers.is_auto(bn) and bn.momentum == 0.9 and bn.name == "auto"
    model = channels_first_stack(bn)
    model.build((None, 3, 6, 6))
    assert bn.axis == 1 and type(bn) is layers.BatchNormalization and bn.gamma.shape == (4,)


def test_get_config_and_from_config():
    bn = bnseq.BatchNormalization(momentum=0.9, name="auto")
    assert bn.get_config()["axis"] == "auto"
    settles_to_channels_first(bnseq.BatchNormalization.from_config(bn.get_config()))
    settles_to_channels_first(keras.layers.deserialize(keras.layers.serialize(bn)))


def test_deepcopy_and_clone_model():
    import copy

    bn = bnseq.BatchNormalization(momentum=0.9, name="auto")
    settles_to_channels_first(copy.deepcopy(bn))
    model = channels_first_stack(bnseq.BatchNormalization(momentum=0.9, name="auto"))
    clone = keras.models.clone_model(model)
    settles_to_channels_first(clone.layers[1])
    assert bnseq.changing.layers.is_auto(model.layers[1])  # the original is untouched


def test_keras_file_of_a_model_not_built_yet(tmp_path):
    model = channels_first_stack(bnseq.BatchNormalization(momentum=0.9, name="auto"))
    with pytest.warns(UserWarning, match="not yet been built"):  # Keras's own warning, as the user sees it
        model.save(tmp_path / "unbuilt.keras")
    loaded = keras.saving.load_model(tmp_path / "unbuilt.keras")
    settles_to_channels_first(loaded.layers[1])


def test_a_settled_layer_saves_as_keras_own(tmp_path):
    model = channels_first_stack(bnseq.BatchNormalization(momentum=0.9, name="auto"))
    model.build((None, 3, 6, 6))
    config = model.layers[1].get_config()
    assert config["axis"] == 1 and keras.layers.serialize(model.layers[1])["module"] == "keras.layers"
