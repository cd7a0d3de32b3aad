"""`bnseq.fold` through pooling: a BatchNormalization after a pooling layer fed by a linear layer folds into it.

Issue 31's first placements: after AveragePooling (always exact: an average of `scale * x + shift`
is `scale * average + shift`) and after MaxPooling (exact where every channel's scale is not
negative; otherwise kept, naming the channels), global pooling included, in 1-D, 2-D and 3-D, both
data formats, on random statistics with signed gamma, measured as `predict` runs the model.
"""

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import probes
from tests.test_fold import randomize_statistics

CONVOLUTIONS = {1: layers.Conv1D, 2: layers.Conv2D, 3: layers.Conv3D}
# Every rank on TensorFlow (the README command, both oneDNN legs, the oldest versions); 2-D on JAX and
# PyTorch, whose legs check each backend's pooling and merges under predict (the fold itself is
# NumPy's, the same on every backend; Keras's JAX and torch pooling share one code path over ranks).
RANKS = [1, 2, 3] if keras.backend.backend() == "tensorflow" else [2]
POOLS = {
    "average": {1: layers.AveragePooling1D, 2: layers.AveragePooling2D, 3: layers.AveragePooling3D},
    "max": {1: layers.MaxPooling1D, 2: layers.MaxPooling2D, 3: layers.MaxPooling3D},
    "global_average": {
        1: layers.GlobalAveragePooling1D,
        2: layers.GlobalAveragePooling2D,
        3: layers.GlobalAveragePooling3D,
    },
    "global_max": {1: layers.GlobalMaxPooling1D, 2: layers.GlobalMaxPooling2D, 3: layers.GlobalMaxPooling3D},
}


def statistics(model, seed=0, signed=True):
    """Random statistics; gamma of both signs unless `signed=False` (then positive)."""
    return randomize_statistics(model, np.random.default_rng(seed), signed=signed)


def pooled(rank, pool, data_format, padding="valid", bias=False, activation="tanh"):
    spatial = (6,) * rank
    channels = 3
    shape = (channels, *spatial) if data_format == "channels_first" else (*spatial, channels)
    inputs = keras.Input(shape)
    x = CONVOLUTIONS[rank](4, 3, padding="same", use_bias=bias, data_format=data_format, name="conv")(inputs)
    options = {"data_format": data_format}
    if not pool.startswith("global"):
        options.update(pool_size=2, padding=padding)
    x = POOLS[pool][rank](name="pool", **options)(x)
    axis = 1 if data_format == "channels_first" and not pool.startswith("global") else -1
    x = layers.BatchNormalization(axis=axis, name="bn")(x)
    if activation:
        x = layers.Activation(activation, name="act")(x)
    return keras.Model(inputs, x)


def predict_error(model, folded, seed=1):
    x = probes.random_inputs(model, batch_size=4, seed=seed)[0]
    expected = keras.tree.flatten(probes.predicted(model, x))
    actual = keras.tree.flatten(probes.predicted(folded, x))
    return max(float(np.max(np.abs(e - a)) / np.max(np.abs(e))) for e, a in zip(expected, actual))


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("pool", ["average", "global_average"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_after_average_pooling_folds_exactly(rank, pool, data_format):
    model = statistics(pooled(rank, pool, data_format, padding="same" if rank == 2 else "valid"))
    (decision,) = bnseq.fold_report(model)
    assert decision.folded and decision.producer == "conv" and "'pool'" in decision.through, decision
    assert str(decision).startswith("bn: folded into conv, moved before ")
    folded = bnseq.fold(model)
    names = [layer.name for layer in folded.layers]
    assert "bn" not in names and "pool" in names and "act" in names  # the activation stays after the pooling
    assert predict_error(model, folded) <= 1e-5


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("pool", ["max", "global_max"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_after_max_pooling_folds_where_every_scale_is_not_negative(rank, pool, data_format):
    model = statistics(pooled(rank, pool, data_format), signed=False)
    model.get_layer("bn").gamma.assign(np.array([1.0, 0.0, 0.5, 2.0], "float32"))  # a zero scale commutes too
    (decision,) = bnseq.fold_report(model)
    assert decision.folded and decision.through is not None
    assert predict_error(model, bnseq.fold(model)) <= 1e-5


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_max_pooling_with_a_negative_scale_is_kept_naming_the_channels(data_format):
    model = statistics(pooled(2, "max", data_format), signed=False)
    model.get_layer("bn").gamma.assign(np.array([1.0, -0.5, 0.5, -2.0], "float32"))
    (decision,) = bnseq.fold_report(model)
    assert not decision.folded
    assert "nor through it: a maximum commutes with its scale only where the scale is not negative" in decision.reason
    assert "channels 1, 3 of its 4 have a negative gamma" in decision.reason
    folded = bnseq.fold(model)
    assert "bn" in [layer.name for layer in folded.layers]
    assert predict_error(model, folded) <= 1e-6


def test_a_bias_and_a_dense_on_sequences_fold_through_too():
    inputs = keras.Input((8, 5))
    x = layers.Dense(4, name="dense")(inputs)  # with a bias: scaled and shifted with it
    x = layers.AveragePooling1D(2, name="pool")(x)
    model = statistics(keras.Model(inputs, layers.BatchNormalization(name="bn")(x)))
    (decision,) = bnseq.fold_report(model)
    assert decision.folded and decision.producer == "dense"
    assert predict_error(model, bnseq.fold(model)) <= 1e-5


@pytest.mark.parametrize(
    "build, reason",
    [
        ("activation", "Conv2D 'conv' applies its activation before AveragePooling2D 'pool'"),
        ("shared_pool", "the output of AveragePooling2D 'pool' is also used elsewhere"),
        ("shared_conv", "the output of Conv2D 'conv' is also used elsewhere"),
        ("channel_pooling", "AveragePooling2D 'pool' pools along the channel axis of Conv2D 'conv'"),
    ],
)
def test_kept_through_pooling_with_the_reason(build, reason):
    inputs = keras.Input((6, 6, 3))
    activation = "relu" if build == "activation" else None
    conv = layers.Conv2D(4, 3, padding="same", use_bias=False, activation=activation, name="conv")(inputs)
    data_format = "channels_first" if build == "channel_pooling" else "channels_last"
    pool = layers.AveragePooling2D(2, data_format=data_format, name="pool")(conv)
    bn = layers.BatchNormalization(name="bn")(pool)
    outputs = [bn]
    if build == "shared_pool":
        outputs.append(layers.Flatten()(pool))
    if build == "shared_conv":
        outputs.append(layers.Flatten()(conv))
    model = statistics(keras.Model(inputs, outputs))
    (decision,) = bnseq.fold_report(model)
    assert not decision.folded and f"nor through it: {reason}" in decision.reason, decision.reason
    folded = bnseq.fold(model)
    assert "bn" in [layer.name for layer in folded.layers]


def test_summary_names_the_pooling_layer():
    model = statistics(pooled(2, "average", "channels_last"))
    (row,) = bnseq.summary(model)
    assert row.fold == "into conv, moved before AveragePooling2D 'pool'"


@pytest.mark.slow
def test_densenet_transition_pooling_is_kept_because_the_dense_block_reads_it_too():
    """DenseNet121's pooled transition output feeds both a BatchNormalization and the block's Concatenate."""
    model = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=4)
    statistics(model, signed=True)
    report = bnseq.fold_report(model)
    after_transition = [decision for decision in report if "follows AveragePooling2D" in decision.reason]
    assert len(after_transition) == 3
    assert all("nor through it: the output of AveragePooling2D" in decision.reason for decision in after_transition)
    assert predict_error(model, bnseq.fold(model)) <= 1e-5


# A BatchNormalization right after another ----------------------------------------------------------


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_a_batch_norm_after_a_batch_norm_folds_into_the_same_layer(data_format, activation):
    shape = (3, 7, 7) if data_format == "channels_first" else (7, 7, 3)
    axis = 1 if data_format == "channels_first" else -1
    inputs = keras.Input(shape)
    x = layers.Conv2D(4, 3, use_bias=False, data_format=data_format, name="conv")(inputs)
    x = layers.BatchNormalization(axis=axis, name="first")(x)
    x = layers.BatchNormalization(axis=axis, name="second")(x)
    if activation:
        x = layers.Activation(activation, name="act")(x)
    model = statistics(keras.Model(inputs, x))
    report = bnseq.fold_report(model)
    assert [str(decision) for decision in report] == [
        "first: folded into conv",
        "second: folded into conv, with first before it",
    ]
    folded = bnseq.fold(model)
    assert [type(layer).__name__ for layer in folded.layers] == ["InputLayer", "Conv2D"]  # the activation merged
    assert predict_error(model, folded) <= 1e-5
    assert [finding.code for finding in bnseq.lint(model)] == ["BN004"]  # still a placement to fix


def test_a_batch_norm_after_one_that_is_kept_is_kept_with_the_reason():
    inputs = keras.Input((5,))
    x = layers.Dense(4, activation="relu", name="dense")(inputs)
    x = layers.BatchNormalization(name="first")(x)
    x = layers.BatchNormalization(name="second")(x)
    model = statistics(keras.Model(inputs, x))
    decisions = {decision.batch_norm: decision for decision in bnseq.fold_report(model)}
    assert not decisions["first"].folded and not decisions["second"].folded
    assert decisions["second"].reason.startswith("it follows BatchNormalization 'first', which is not a linear layer")


# Forward across Flatten or Reshape into a Dense layer ----------------------------------------------


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("flattening", ["flatten", "reshape"])
def test_forward_across_a_flatten_into_a_dense(data_format, flattening):
    shape = (3, 5, 4) if data_format == "channels_first" else (5, 4, 3)
    axis = 1 if data_format == "channels_first" else -1
    inputs = keras.Input(shape)
    x = layers.BatchNormalization(axis=axis, name="bn")(inputs)  # on the model input: nothing before it
    if flattening == "flatten":
        x = layers.Flatten(data_format=data_format, name="flat")(x)
    else:
        x = layers.Reshape((-1,), name="flat")(x)
    model = statistics(keras.Model(inputs, layers.Dense(6, name="dense")(x)))
    (decision,) = bnseq.fold_report(model)
    assert decision.folded and decision.into == "dense" and "'flat'" in decision.through
    assert str(decision).startswith("bn: folded forward into dense, across ")
    folded = bnseq.fold(model)
    assert "bn" not in [layer.name for layer in folded.layers]
    assert predict_error(model, folded) <= 1e-5


def test_after_an_activation_across_a_flatten():
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Flatten(name="flat")(x)
    model = statistics(keras.Model(inputs, layers.Dense(4, use_bias=False, name="dense")(x)))
    (decision,) = bnseq.fold_report(model)
    assert decision.folded and decision.into == "dense"
    assert predict_error(model, bnseq.fold(model)) <= 1e-5


def test_across_a_flatten_used_elsewhere_is_kept_with_the_reason():
    inputs = keras.Input((4, 3))
    x = layers.BatchNormalization(name="bn")(inputs)
    flat = layers.Flatten(name="flat")(x)
    model = statistics(keras.Model(inputs, [layers.Dense(2, name="dense")(flat), flat]))
    (decision,) = bnseq.fold_report(model)
    assert not decision.folded
    assert "nor forward: the output of Flatten 'flat' is also used elsewhere" in decision.reason


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("pool, options", [
    ("average", dict(pool_size=3, strides=1)),
    ("average", dict(pool_size=2)),
    ("max", dict(pool_size=3, strides=2)),
])  # fmt: skip
def test_padded_pooling_borders_stay_exact(data_format, pool, options):
    """padding="same" on a 5x5 map pads the border; an average there counts only the real positions."""
    shape = (3, 5, 5) if data_format == "channels_first" else (5, 5, 3)
    inputs = keras.Input(shape)
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, data_format=data_format, name="conv")(inputs)
    x = POOLS[pool][2](data_format=data_format, padding="same", name="pool", **options)(x)
    x = layers.BatchNormalization(axis=1 if data_format == "channels_first" else -1, name="bn")(x)
    model = statistics(keras.Model(inputs, x), signed=pool == "average")
    (decision,) = bnseq.fold_report(model)
    assert decision.folded
    assert predict_error(model, bnseq.fold(model)) <= 1e-5


# Across merges: a BatchNormalization after an Add or a Concatenate of linear layers that only the merge reads.


def merged(rank, merge, data_format, activation="tanh", bias=False):
    spatial = (5,) * rank
    shape = (3, *spatial) if data_format == "channels_first" else (*spatial, 3)
    axis = 1 if data_format == "channels_first" else -1
    inputs = keras.Input(shape)
    a = CONVOLUTIONS[rank](4, 3, padding="same", use_bias=bias, data_format=data_format, name="conv_a")(inputs)
    b = CONVOLUTIONS[rank](4 if merge != "concatenate" else 2, 1, use_bias=True, data_format=data_format,
                           name="conv_b")(inputs)
    if merge == "add":
        x = layers.Add(name="merge")([a, b])
    elif merge == "plus":
        x = a + b
    else:
        x = layers.Concatenate(axis=axis, name="merge")([a, b])
    x = layers.BatchNormalization(axis=axis, name="bn")(x)
    if activation:
        x = layers.Activation(activation, name="act")(x)
    return statistics(keras.Model(inputs, x))


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("merge", ["add", "plus", "concatenate"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_after_a_merge_of_linear_layers_it_splits_into_each(rank, merge, data_format):
    model = merged(rank, merge, data_format)
    folded, report = bnseq.fold_with_report(model)
    (decision,) = report
    assert decision.folded and decision.split == ("conv_a", "conv_b"), str(decision)
    assert str(decision).startswith("bn: split across ") and str(decision).endswith("folded into conv_a, conv_b")
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded.layers)
    assert predict_error(model, folded) < 1e-5


def test_dense_layers_on_sequences_split_too_and_the_source_is_untouched():
    inputs = keras.Input((6, 5))
    a = layers.Dense(4, use_bias=False, name="a")(inputs)
    b = layers.Dense(4, name="b")(inputs)
    c = layers.Dense(4, name="c")(inputs)
    model = statistics(keras.Model(inputs, layers.BatchNormalization(name="bn")(layers.Add(name="sum")([a, b, c]))))
    before = [np.array(weight) for weight in model.get_weights()]
    folded, report = bnseq.fold_with_report(model)
    assert report[0].split == ("a", "b", "c")
    assert predict_error(model, folded) < 1e-5
    assert all(np.array_equal(x, y) for x, y in zip(before, model.get_weights()))


def _merge_kept(kind):
    inputs = keras.Input((6, 6, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(4, 1, name="b")(inputs)
    if kind == "activation":
        b = layers.Conv2D(4, 1, activation="relu", name="b_relu")(inputs)
    if kind == "input":
        b = layers.Conv2D(3, 1, name="b3")(inputs)
        merged_ = layers.Add(name="sum")([layers.Conv2D(3, 1, name="a3")(inputs), inputs])
        return statistics(keras.Model(inputs, layers.BatchNormalization(name="bn")(merged_)))
    merged_ = layers.Add(name="sum")([a, b])
    outputs = [layers.BatchNormalization(name="bn")(merged_)]
    if kind == "shared":
        outputs.append(a)
    if kind == "merge_shared":
        outputs.append(merged_)
    if kind == "concat_width":
        merged_ = layers.Concatenate(axis=2, name="cat")([a, b])
        outputs = [layers.BatchNormalization(axis=3, name="bn")(merged_)]
    return statistics(keras.Model(inputs, outputs))


@pytest.mark.parametrize("kind, reason", [
    ("activation", "Conv2D 'b_relu' applies its activation before Add 'sum'"),
    ("shared", "the output of Conv2D 'a' is also used elsewhere"),
    ("merge_shared", "the output of Add 'sum' is also used elsewhere"),
    ("input", "an input of Add 'sum' is a model input"),
    ("concat_width", "concatenates along axis 2, not the channel axis"),
])
def test_kept_across_a_merge_with_the_reason(kind, reason):
    model = _merge_kept(kind)
    report = bnseq.fold_report(model)
    (decision,) = [each for each in report if each.batch_norm == "bn"]
    assert not decision.folded and reason in decision.reason, str(decision)
    assert predict_error(model, bnseq.fold(model)) < 1e-5


def test_after_an_add_and_a_leaky_relu_it_splits_only_where_the_fusion_is_sound(monkeypatch):
    from bnseq.deciding import fold_through

    inputs = keras.Input((6, 6, 3))
    a = layers.Conv2D(4, 3, padding="same", use_bias=False, name="a")(inputs)
    b = layers.Conv2D(4, 1, use_bias=False, name="b")(inputs)
    x = layers.BatchNormalization(name="bn")(layers.Add(name="sum")([a, b]))
    model = statistics(keras.Model(inputs, layers.LeakyReLU(0.1, name="leaky")(x)))
    monkeypatch.setattr(fold_through.probes, "leaky_relu_fusion_is_sound", lambda: False)
    (decision,) = bnseq.fold_report(model)
    assert not decision.folded and "oneDNN" in decision.reason
    monkeypatch.undo()
    folded = bnseq.fold(model)  # whatever this machine decides, predict stays right
    assert predict_error(model, folded) < 1e-5


# Across a nested model's boundary: where each layer is called once, the fold changes nothing else.


@pytest.mark.parametrize("nesting", ["sequential", "functional"])
def test_a_convolution_inside_a_nested_model_takes_the_outer_batch_norm(nesting):
    if nesting == "sequential":
        inner = keras.Sequential([keras.Input((6, 6, 3)), layers.Conv2D(4, 3, name="c")], name="inner")
    else:
        inner_inputs = keras.Input((6, 6, 3))
        inner = keras.Model(inner_inputs, layers.Conv2D(4, 3, name="c")(inner_inputs), name="inner")
    inputs = keras.Input((6, 6, 3))
    x = layers.BatchNormalization(name="bn")(inner(inputs))
    model = statistics(keras.Model(inputs, layers.Activation("relu", name="act")(x)))
    folded, (decision,) = bnseq.fold_with_report(model)
    assert str(decision) == "bn: folded into c"
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded._flatten_layers())
    assert predict_error(model, folded) < 1e-5


def test_a_nested_model_called_twice_keeps_its_batch_norms_with_the_reason():
    tower = keras.Sequential([keras.Input((4,)), layers.Dense(3, name="d")], name="tower")
    a, b = keras.Input((4,)), keras.Input((4,))
    model = keras.Model(
        [a, b], [layers.BatchNormalization(name="bn_a")(tower(a)), layers.BatchNormalization(name="bn_b")(tower(b))]
    )
    statistics(model)
    report = bnseq.fold_report(model)
    assert [decision.folded for decision in report] == [False, False]
    assert all("also used elsewhere" in decision.reason for decision in report)
