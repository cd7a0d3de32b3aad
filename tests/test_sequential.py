"""bnseq.Sequential: structure, the oracle against hand-written Keras, errors."""

import re
import warnings
from unittest import mock

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq.probes import infer


def classes(model):
    return [type(layer).__name__ for layer in model.layers]


def readme_example():
    model = bnseq.Sequential(batch_norm=True)
    model.add(keras.Input((3, 10, 10)))
    model.add(layers.Conv2D(4, (3, 3), data_format="channels_first"))
    model.add(layers.Flatten())
    model.add(layers.Dense(8, activation="relu"))
    model.add(layers.Dense(5, activation="softmax"), batch_norm=False)
    return model


def by_hand_example():
    return keras.Sequential(
        [
            keras.Input((3, 10, 10)),
            layers.Conv2D(4, (3, 3), data_format="channels_first", use_bias=False),
            layers.BatchNormalization(axis=1),
            layers.Flatten(),
            layers.Dense(8, use_bias=False),
            layers.BatchNormalization(axis=-1),
            layers.Activation("relu"),
            layers.Dense(5, activation="softmax"),
        ]
    )


def state(model):
    """Everything a failed call must leave as it was."""
    return (
        [id(layer) for layer in model._layers],
        model._unit_sizes,
        model.built,
        id(model._functional),
        [layer.get_config() for layer in model.layers],
    )


# Structure ----------------------------------------------------------------


def test_readme_example_structure():
    model = readme_example()
    assert classes(model) == [
        "Conv2D",
        "BatchNormalization",
        "Flatten",
        "Dense",
        "BatchNormalization",
        "Activation",
        "Dense",
    ]
    conv, conv_bn, _, dense, dense_bn, act, out = model.layers
    assert not conv.use_bias and not dense.use_bias
    assert conv.activation is keras.activations.linear
    assert dense.activation is keras.activations.linear
    assert (conv_bn.axis, dense_bn.axis) == (1, -1)
    assert conv_bn.gamma.shape == (4,)
    assert act.activation is keras.activations.relu
    assert out.use_bias and out.activation is keras.activations.softmax
    assert model.output_shape == (None, 5)


def test_added_layer_stays_the_users_object():
    model = bnseq.Sequential([keras.Input((4,))], batch_norm=True)
    dense = layers.Dense(3, activation="tanh")
    model.add(dense)
    assert model.layers[0] is dense
    assert dense.get_config()["use_bias"] is False
    assert dense.get_config()["activation"] == "linear"


def test_oracle_against_hand_written_keras():
    """Same parameters and, with weights copied, the same outputs."""
    ours, theirs = readme_example(), by_hand_example()
    assert ours.count_params() == theirs.count_params()
    assert classes(ours) == classes(theirs)
    rng = np.random.default_rng(0)
    # Non-trivial BatchNormalization statistics and weights.
    weights = [rng.normal(size=w.shape).astype("float32") for w in theirs.weights]
    for i, w in enumerate(theirs.weights):
        if "variance" in w.path:
            weights[i] = np.abs(weights[i]) + 0.5
    theirs.set_weights(weights)
    ours.set_weights(weights)
    x = rng.normal(size=(6, 3, 10, 10)).astype("float32")
    for training in (False, True):
        np.testing.assert_array_equal(
            infer(ours, x, training=training), infer(theirs, x, training=training)
        )


@pytest.mark.parametrize(
    "make, data_format, axis",
    [
        (lambda f: layers.Dense(3), None, -1),
        (lambda f: layers.Conv1D(3, 2, data_format=f), "channels_last", -1),
        (lambda f: layers.Conv1D(3, 2, data_format=f), "channels_first", 1),
        (lambda f: layers.Conv2D(3, 2, data_format=f), "channels_first", 1),
        (lambda f: layers.Conv3D(3, 2, data_format=f), "channels_first", 1),
        (lambda f: layers.Conv2DTranspose(3, 2, data_format=f), "channels_first", 1),
        (lambda f: layers.DepthwiseConv2D(2, data_format=f), "channels_first", 1),
        (lambda f: layers.SeparableConv1D(3, 2, data_format=f), "channels_last", -1),
    ],
)
def test_batch_norm_goes_on_the_channel_axis(make, data_format, axis):
    model = bnseq.Sequential(batch_norm=True)
    layer = make(data_format)
    model.add(layer)
    assert model.layers[1].axis == axis


def test_data_format_follows_keras_image_data_format():
    keras.config.set_image_data_format("channels_first")
    try:
        model = bnseq.Sequential([layers.Conv2D(2, 3)], batch_norm=True)
    finally:
        keras.config.set_image_data_format("channels_last")
    assert model.layers[1].axis == 1


def test_subclass_of_a_linear_layer_is_normalized():
    class MyDense(layers.Dense):
        pass

    model = bnseq.Sequential([MyDense(2, activation="relu")], batch_norm=True)
    assert classes(model) == ["MyDense", "BatchNormalization", "Activation"]


@pytest.mark.parametrize(
    "activation, expected",
    [
        (None, []),
        ("linear", []),
        ("relu", ["Activation"]),
        (keras.activations.gelu, ["Activation"]),
        (lambda x: 2 * x, ["Activation"]),
    ],
)
def test_activation_becomes_its_own_layer(activation, expected):
    model = bnseq.Sequential([keras.Input((4,))], batch_norm=True)
    model.add(layers.Dense(3, activation=activation))
    assert classes(model) == ["Dense", "BatchNormalization", *expected]
    if expected:
        assert model.layers[-1].activation is keras.activations.get(activation)


def test_activation_given_as_a_layer_is_moved_not_copied():
    leaky = layers.LeakyReLU(negative_slope=0.3)
    dense = layers.Dense(3, activation=leaky)
    model = bnseq.Sequential([keras.Input((4,)), dense], batch_norm=True)
    assert model.layers[2] is leaky
    assert leaky not in dense._layers  # no longer a sublayer of the Dense
    assert len(model.weights) == len(dense.weights) + 4
    x = np.ones((2, 4), "float32")
    assert model(x).shape == (2, 3)


def test_other_layers_pass_through_untouched():
    flatten, dropout = layers.Flatten(), layers.Dropout(0.5)
    einsum = layers.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c")
    lstm = layers.LSTM(2, return_sequences=True)
    model = bnseq.Sequential(
        [keras.Input((4, 2)), lstm, flatten, dropout, einsum], batch_norm=True
    )
    assert model.layers == [lstm, flatten, dropout, einsum]
    assert einsum.bias is not None


def test_activity_regularizer_moves_to_the_end_of_the_unit():
    regularizer = keras.regularizers.L2(0.5)
    ours = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    ours.add(layers.Dense(2, activation="tanh", activity_regularizer=regularizer))
    assert ours.layers[0].activity_regularizer is None
    assert ours.layers[-1].activity_regularizer is regularizer
    theirs = keras.Sequential(
        [
            keras.Input((3,)),
            layers.Dense(2, use_bias=False),
            layers.BatchNormalization(),
            layers.Activation("tanh", activity_regularizer=regularizer),
        ]
    )
    theirs.set_weights(ours.get_weights())
    x = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    ours(x)
    theirs(x)
    np.testing.assert_allclose(
        [float(loss) for loss in ours.losses], [float(loss) for loss in theirs.losses]
    )
    assert ours.losses and float(ours.losses[0]) > 0


def test_inserted_layers_follow_the_dtype_policy():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    model.add(layers.Dense(2, activation="relu", dtype="float64"))
    _, bn, act = model.layers
    assert bn.dtype_policy.name == act.dtype_policy.name == "float64"
    assert bn.gamma.dtype == "float64"


def test_batch_norm_options_reach_every_inserted_layer():
    model = bnseq.Sequential(
        [keras.Input((3,)), layers.Dense(2), layers.Dense(2)],
        batch_norm={"momentum": 0.5, "epsilon": 1e-5, "center": False},
    )
    for bn in model.layers[1::2]:
        assert (bn.momentum, bn.epsilon, bn.center) == (0.5, 1e-5, False)


def test_per_layer_options_merge_over_the_models():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm={"momentum": 0.5})
    model.add(layers.Dense(2), batch_norm={"epsilon": 0.01})
    model.add(layers.Dense(2), batch_norm=False)
    model.add(layers.Dense(2))
    assert classes(model) == [
        "Dense",
        "BatchNormalization",
        "Dense",
        "Dense",
        "BatchNormalization",
    ]
    assert (model.layers[1].momentum, model.layers[1].epsilon) == (0.5, 0.01)
    assert model.layers[2].use_bias
    assert model.batch_norm == {"momentum": 0.5}


def test_per_layer_opt_in_on_a_plain_model():
    model = bnseq.Sequential([keras.Input((3,))])
    model.add(layers.Dense(2, activation="relu"))
    model.add(layers.Dense(2, activation="relu"), batch_norm=True)
    assert classes(model) == ["Dense", "Dense", "BatchNormalization", "Activation"]
    assert model.batch_norm is False


def test_list_form_markers():
    marked = bnseq.with_batch_norm(layers.Dense(2, activation="relu"), momentum=0.8)
    kept = bnseq.without_batch_norm(layers.Dense(2))
    plain = bnseq.Sequential([keras.Input((3,)), marked, layers.Dense(2)])
    assert classes(plain) == ["Dense", "BatchNormalization", "Activation", "Dense"]
    assert plain.layers[1].momentum == 0.8
    normalized = bnseq.Sequential(
        [keras.Input((3,)), layers.Dense(2), kept], batch_norm=True
    )
    assert classes(normalized) == ["Dense", "BatchNormalization", "Dense"]
    assert normalized.layers[2].use_bias


def test_names_are_derived_and_never_collide():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    model.add(layers.Dense(2, name="a_bn"), batch_norm=False)
    model.add(layers.Dense(2, name="a_relu"), batch_norm=False)
    model.add(layers.Dense(2, activation="relu", name="a"))
    model.add(layers.Dense(2, activation="relu", name="b"))
    names = [layer.name for layer in model.layers]
    assert names == ["a_bn", "a_relu", "a", "a_bn_1", "a_relu_1", "b", "b_bn", "b_relu"]
    assert len(set(names)) == len(names)


def test_one_add_rebuilds_once():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    # Keras wraps `build` on each instance, so the instance is patched.
    with mock.patch.object(model, "build", wraps=model.build) as build:
        model.add(layers.Dense(2, activation="relu"))
    assert build.call_count == 1
    assert model.built and model.output_shape == (None, 2)


def test_rebuild_false_defers_the_build():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    model.add(layers.Dense(2, activation="relu"), rebuild=False)
    assert not model.built
    model.add(layers.Dense(1))
    assert model.built and model.output_shape == (None, 1)


def test_model_built_later_on_data():
    model = bnseq.Sequential(batch_norm=True)
    model.add(layers.Dense(4, activation="relu"))
    model.add(layers.Dense(1))
    assert not model.built
    out = model(np.ones((2, 3), "float32"))
    assert out.shape == (2, 1)
    assert classes(model) == [
        "Dense",
        "BatchNormalization",
        "Activation",
        "Dense",
        "BatchNormalization",
    ]


def test_trains():
    model = readme_example()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3, 10, 10)).astype("float32")
    y = rng.integers(0, 5, size=(16,))
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


# pop ------------------------------------------------------------------------


def test_pop_removes_the_whole_unit_and_returns_the_users_layer():
    model = readme_example()
    out = model.layers[-1]
    dense = model.layers[3]
    assert model.pop() is out
    assert model.pop() is dense
    assert classes(model) == ["Conv2D", "BatchNormalization", "Flatten"]
    assert model.output_shape == (None, 4 * 8 * 8)
    model.pop()
    model.pop()
    assert model.layers == []


def test_pop_on_an_empty_model():
    model = bnseq.Sequential(batch_norm=True)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Sequential model 'sequential' has no layers to pop. Check "
            "`len(model.layers)` before calling `pop()`."
        ),
    ):
        model.pop()
    with pytest.raises(IndexError):  # as keras.Sequential.pop raises
        model.pop()


# Placement warnings -----------------------------------------------------------


def test_warns_about_batch_norm_after_a_bias():
    model = bnseq.Sequential([keras.Input((3,)), layers.Dense(2, name="d")])
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        model.add(layers.BatchNormalization(name="bn"))
    assert [str(w.message) for w in record] == [
        "Dense 'd' adds a bias that BatchNormalization 'bn' subtracts again "
        "(2 parameters wasted). Write `Dense(..., use_bias=False)`, or let "
        "bnseq.Sequential(batch_norm=True) do it."
    ]
    assert record[0].filename == __file__


def test_warns_about_batch_norm_after_a_nonlinearity():
    model = bnseq.Sequential(
        [keras.Input((3,)), layers.Dense(2, use_bias=False), layers.ReLU(name="r")]
    )
    with pytest.warns(bnseq.BatchNormPlacementWarning, match="after the nonlinearity of ReLU 'r'"):
        model.add(layers.BatchNormalization())


def test_warns_about_the_wrong_axis_after_channels_first():
    model = bnseq.Sequential(
        [
            keras.Input((3, 6, 6)),
            layers.Conv2D(4, 3, use_bias=False, data_format="channels_first", name="c"),
        ]
    )
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        model.add(layers.BatchNormalization(name="bn"))
    assert [str(w.message) for w in record] == [
        "BatchNormalization 'bn' normalizes axis -1, but the channels of "
        "Conv2D 'c' (channels_first) are on axis 1. Write "
        "`BatchNormalization(axis=1)`."
    ]


@pytest.mark.parametrize("axis", [1, -3])
def test_no_warning_for_a_right_placement(axis):
    model = bnseq.Sequential(
        [
            keras.Input((3, 6, 6)),
            layers.Conv2D(4, 3, use_bias=False, data_format="channels_first"),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.add(layers.BatchNormalization(axis=axis))
        model.add(layers.Activation("relu"))


def test_warns_about_bias_arguments_that_no_longer_apply():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        model.add(
            layers.Dense(
                2,
                name="d",
                bias_regularizer="l2",
                bias_constraint="non_neg",
            )
        )
    assert [str(w.message) for w in record] == [
        "Dense 'd' (layer 0) sets bias_regularizer, bias_constraint, but bnseq "
        "removes its bias (the BatchNormalization after it has its own offset, "
        "`beta`), so these settings no longer apply. Remove them, or add the "
        "layer with batch_norm=False to keep its bias."
    ]
    assert record[0].filename == __file__


def test_no_bias_warning_for_defaults_or_a_kept_bias():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
        model.add(layers.Dense(2))
        model.add(layers.Dense(2, bias_regularizer="l2"), batch_norm=False)


# Bad input ----------------------------------------------------------------


def test_error_not_a_layer():
    model = readme_example()
    before = state(model)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Only instances of `keras.Layer` can be added to a Sequential "
            "model. Received: relu (of type <class 'str'>) as layer 7 of "
            "'sequential'."
        ),
    ):
        model.add("relu")
    assert state(model) == before


def test_error_layer_already_built_with_a_bias():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    dense = layers.Dense(2, name="d")
    dense.build((None, 3))
    before = state(model)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Dense 'd' (layer 0) is already built and its bias variable holds "
            "weights, which bnseq will not silently drop. Add a new, unbuilt "
            "layer (e.g. `Dense.from_config(layer.get_config())`), or add this "
            "one with batch_norm=False to keep it as it is."
        ),
    ):
        model.add(dense)
    assert state(model) == before
    assert dense.use_bias and dense.bias is not None
    model.add(dense, batch_norm=False)  # the fix the message gives
    assert model.layers == [dense]


def test_built_layer_without_a_bias_is_accepted():
    dense = layers.Dense(2, use_bias=False, activation="relu")
    dense.build((None, 3))
    model = bnseq.Sequential([keras.Input((3,)), dense], batch_norm=True)
    assert classes(model) == ["Dense", "BatchNormalization", "Activation"]


def test_error_same_layer_added_twice():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    dense = layers.Dense(3, name="d")
    model.add(dense)
    before = state(model)
    message = re.escape(
        "Dense 'd' (layer 2) is already in Sequential model 'sequential'. "
        "Normalizing it again would change the copy already in the model; add "
        "a new layer instead (e.g. `Dense.from_config(layer.get_config())`)."
    )
    with pytest.raises(ValueError, match=message):
        model.add(dense)
    with pytest.raises(ValueError, match=message):
        model.add(dense, batch_norm=False)
    assert state(model) == before


def test_plain_mode_keeps_keras_layer_sharing():
    dense = layers.Dense(3)
    model = bnseq.Sequential([keras.Input((3,)), dense, dense])
    theirs = keras.Sequential([keras.Input((3,)), dense, dense])
    assert model.layers == theirs.layers == [dense, dense]


@pytest.mark.parametrize("value", ["yes", 1, None, [("momentum", 0.9)]])
def test_error_batch_norm_of_the_wrong_type(value):
    with pytest.raises(
        TypeError,
        match=re.escape(
            "`batch_norm` must be True, False or a dict of "
            "keras.layers.BatchNormalization arguments, such as "
            f"{{'momentum': 0.9}}. Received: batch_norm={value!r} "
            f"(of type {type(value).__name__})"
        ),
    ):
        bnseq.Sequential(batch_norm=value)


def test_error_batch_norm_with_axis():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`batch_norm` cannot set `axis`: bnseq puts each BatchNormalization "
            "on the channel axis of the layer before it (-1 for Dense and "
            "channels_last, 1 for channels_first). Remove it. "
            "Received: batch_norm={'axis': 1}"
        ),
    ):
        bnseq.Sequential(batch_norm={"axis": 1})


def test_error_batch_norm_with_an_unknown_key():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`batch_norm` has an unknown BatchNormalization argument `momentun`. "
            "Did you mean `momentum`? Valid arguments: momentum, epsilon, "
        ),
    ):
        bnseq.Sequential(batch_norm={"momentun": 0.9})


@pytest.mark.parametrize(
    "options, expected",
    [
        (
            {"gamma_initializer": "nope"},
            "`batch_norm`: keras.layers.BatchNormalization rejects these options "
            "on the tensorflow backend: Could not interpret initializer "
            "identifier: nope Received: batch_norm={'gamma_initializer': 'nope'}",
        ),
        (
            {"momentum": "fast"},
            "`batch_norm`: `momentum` must be a finite number. "
            "Received: batch_norm={'momentum': 'fast'}",
        ),
        (
            {"momentum": 1.5},
            "`batch_norm`: `momentum` must be between 0 and 1. "
            "Received: batch_norm={'momentum': 1.5}",
        ),
        (
            {"epsilon": 0},
            "`batch_norm`: `epsilon` must be greater than 0. "
            "Received: batch_norm={'epsilon': 0}",
        ),
        (
            {"center": "yes"},
            "`batch_norm`: `center` must be True or False. "
            "Received: batch_norm={'center': 'yes'}",
        ),
    ],
)
def test_error_batch_norm_with_an_invalid_value(options, expected):
    if keras.backend.backend() != "tensorflow":
        expected = expected.replace("tensorflow", keras.backend.backend())
    with pytest.raises(ValueError, match=re.escape(expected)):
        bnseq.Sequential(batch_norm=options)


def test_error_per_layer_batch_norm_of_the_wrong_type():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    before = state(model)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "`batch_norm` for Dense 'd' (layer 0) must be True, False or a dict "
            "of keras.layers.BatchNormalization arguments, such as "
            "{'momentum': 0.9}. Received: batch_norm='on' (of type str)"
        ),
    ):
        model.add(layers.Dense(2, name="d"), batch_norm="on")
    assert state(model) == before


def test_error_per_layer_batch_norm_on_a_layer_that_is_not_linear():
    model = bnseq.Sequential([keras.Input((3, 3))])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Flatten 'f' (layer 0) is not a layer bnseq can batch-normalize (it "
            "normalizes Dense, Conv1D, Conv2D, Conv3D, Conv1DTranspose, "
            "Conv2DTranspose, Conv3DTranspose, DepthwiseConv1D, DepthwiseConv2D, "
            "SeparableConv1D, SeparableConv2D and their subclasses). Add it with "
            "batch_norm=False or without a batch_norm argument."
        ),
    ):
        model.add(layers.Flatten(name="f"), batch_norm=True)
    assert model.layers == []


def test_error_marker_contradicts_add():
    model = bnseq.Sequential([keras.Input((3,))])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Dense 'd' (layer 0) was marked with without_batch_norm(), which "
            "contradicts add(batch_norm=True). Keep one of the two."
        ),
    ):
        model.add(bnseq.without_batch_norm(layers.Dense(2, name="d")), batch_norm=True)
    assert model.layers == []


def test_error_markers_on_bad_layers():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "`with_batch_norm` marks a Keras layer. Received: layer='dense' "
            "(of type str)"
        ),
    ):
        bnseq.with_batch_norm("dense")
    with pytest.raises(TypeError, match=re.escape("`without_batch_norm` marks")):
        bnseq.without_batch_norm(None)
    with pytest.raises(ValueError, match="is not a layer bnseq can batch-normalize"):
        bnseq.with_batch_norm(layers.Dropout(0.1))
    with pytest.raises(ValueError, match="cannot set `axis`"):
        bnseq.with_batch_norm(layers.Dense(2), axis=1)


def test_error_duplicate_name_leaves_model_and_layer_unchanged():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    model.add(layers.Dense(2, name="d"), batch_norm=False)
    before = state(model)
    clash = layers.Dense(2, name="d", activation="relu")
    with pytest.raises(ValueError, match="Name 'd' is already the name of a layer"):
        model.add(clash)
    assert state(model) == before
    assert clash.use_bias and clash.activation is keras.activations.relu


def test_error_activation_layer_name_clash_leaves_everything_unchanged():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    model.add(layers.ReLU(name="r"))
    before = state(model)
    leaky = layers.LeakyReLU(name="r")
    dense = layers.Dense(2, activation=leaky)
    with pytest.raises(ValueError, match="Name 'r' is already the name of a layer"):
        model.add(dense)
    assert state(model) == before
    assert dense.use_bias and dense.activation is leaky and leaky in dense._layers


def test_failed_rebuild_leaves_model_and_layer_unchanged():
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    model.add(layers.Dense(2, activation="relu"))
    before = state(model)
    conv = layers.Conv2D(2, 3, activation="relu")  # needs a rank-4 input
    with pytest.raises(ValueError, match="expected min_ndim=4"):
        model.add(conv)
    assert state(model) == before
    assert conv.use_bias and conv.activation is keras.activations.relu
    model.add(layers.Dense(1))  # and the model still works
    assert model.output_shape == (None, 1)


def test_error_conflicting_activity_regularizers():
    leaky = layers.LeakyReLU(activity_regularizer="l2")
    dense = layers.Dense(2, activation=leaky, activity_regularizer="l1", name="d")
    model = bnseq.Sequential([keras.Input((3,))], batch_norm=True)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Dense 'd' (layer 0) and its activation layer 'leaky_re_lu' both have "
            "an activity_regularizer"
        ),
    ):
        model.add(dense)
    assert model.layers == []


# Incremental build -------------------------------------------------------------


class CountingDense(layers.Dense):
    """A Dense that counts how often it is traced or run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def test_add_traces_only_the_new_layers():
    model = bnseq.Sequential([keras.Input((4,))], batch_norm=True)
    first = CountingDense(4, activation="relu")
    model.add(first)
    for _ in range(5):
        model.add(layers.Dense(4, activation="relu"))
    assert first.calls == 1  # keras.Sequential would have traced it 6 times
    plain = keras.Sequential([keras.Input((4,))])
    counted = CountingDense(4)
    plain.add(counted)
    for _ in range(5):
        plain.add(layers.Dense(4))
    assert counted.calls == 6


def test_incremental_graph_computes_what_a_full_build_computes():
    model = bnseq.Sequential([keras.Input((5,))], batch_norm=True)
    for units in (6, 4, 3):
        model.add(layers.Dense(units, activation="tanh"))
    model.add(layers.Dense(2), batch_norm=False)
    rebuilt = bnseq.Sequential.from_config(model.get_config())  # built in one go
    rebuilt.set_weights(model.get_weights())
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    for training in (False, True):
        a = keras.ops.convert_to_numpy(model(x, training=training))
        b = keras.ops.convert_to_numpy(rebuilt(x, training=training))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert model.output_shape == (None, 2)


def test_pop_then_add_rebuilds_correctly():
    model = bnseq.Sequential([keras.Input((5,))], batch_norm=True)
    model.add(layers.Dense(4, activation="relu"))
    model.add(layers.Dense(3, activation="relu"))
    model.pop()
    model.add(layers.Dense(7))
    assert model.output_shape == (None, 7)
    assert model(np.ones((2, 5), "float32")).shape == (2, 7)


# A BatchNormalization the user placed is taken over, never doubled ------------


def test_list_form_takes_over_the_users_batch_norm():
    user_bn = layers.BatchNormalization(momentum=0.9, name="mine")
    model = bnseq.Sequential(
        [keras.Input((8, 8, 3)), layers.Conv2D(8, 3, name="c"), user_bn, layers.Activation("relu", name="act")],
        batch_norm=True,
    )
    assert classes(model) == ["Conv2D", "BatchNormalization", "Activation"]
    assert model.layers[1] is user_bn and user_bn.momentum == 0.9
    assert bnseq.lint(model) == []
    assert model.pop().name == "act"
    assert model.pop().name == "c"  # the unit: conv and the user's BN
    assert model.layers == []


def test_add_takes_over_a_batch_norm_after_the_activation():
    """The naive placement `Dense(relu)`, BN becomes Dense, BN, ReLU, as batch_normalize does."""
    model = bnseq.Sequential([keras.Input((4,))], batch_norm=True)
    model.add(layers.Dense(5, activation="relu", name="d"))
    user_bn = layers.BatchNormalization(epsilon=0.01, name="mine")
    model.add(user_bn)
    assert [layer.name for layer in model.layers] == ["d", "mine", "d_relu"]
    assert bnseq.lint(model) == []


def test_takes_over_after_an_activation_layer():
    model = bnseq.Sequential(
        [keras.Input((4,)), layers.Dense(5, name="d"), layers.ReLU(name="r"), layers.BatchNormalization(name="mine")],
        batch_norm=True,
    )
    assert [layer.name for layer in model.layers] == ["d", "mine", "r"]


def test_takeover_on_the_wrong_axis_gets_the_right_one_with_a_warning():
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        model = bnseq.Sequential(
            [
                keras.Input((3, 8, 8)),
                layers.Conv2D(4, 3, data_format="channels_first", name="c"),
                layers.BatchNormalization(momentum=0.8, name="mine"),
            ],
            batch_norm=True,
        )
    (bn,) = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    assert (bn.name, bn.axis, bn.momentum) == ("mine", 1, 0.8)
    placement = [str(w.message) for w in record if w.category is bnseq.BatchNormPlacementWarning]
    assert placement == [
        "BatchNormalization 'mine' (item 2 of the layers list) normalizes axis -1, but it takes the place "
        "of the normalization of Conv2D 'c', whose channels are on axis 1: bnseq uses a new "
        "BatchNormalization 'mine' with its options on axis 1. Write `BatchNormalization(axis=1)` to say so."
    ]


def test_a_second_batch_norm_is_bn004():
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(5, name="d")], batch_norm=True)
    model.add(layers.BatchNormalization(name="first"))
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        model.add(layers.BatchNormalization(name="second"))
    assert [str(w.message) for w in record] == [
        "BatchNormalization 'second' directly follows BatchNormalization 'first', whose output is already "
        "normalized; the second one only adds parameters and computation. Keep one of them."
    ]
    assert [(f.code, f.layer, f.producer) for f in bnseq.lint(model)] == [("BN004", "second", "first")]


def test_batch_norm_false_adds_a_batch_norm_unchanged():
    model = bnseq.Sequential([keras.Input((4,)), layers.Dense(5, name="d")], batch_norm=True)
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        model.add(layers.BatchNormalization(name="extra"), batch_norm=False)
    assert [str(w.message) for w in record] == [
        "BatchNormalization 'extra' directly follows BatchNormalization 'd_bn', whose output is already "
        "normalized; the second one only adds parameters and computation. Keep one of them."
    ]
    assert [layer.name for layer in model.layers] == ["d", "d_bn", "extra"]
