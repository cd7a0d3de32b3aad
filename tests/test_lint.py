"""bnseq.lint: each rule fires where it must and stays quiet where it must not."""

import re

import keras
import pytest
from keras import layers

import bnseq


def codes(model):
    return [(finding.code, finding.layer) for finding in bnseq.lint(model)]


def seq(*stack, shape=(4,)):
    return keras.Sequential([keras.Input(shape), *stack])


# BN001 ----------------------------------------------------------------------


def test_bn001_bias_before_batch_norm():
    model = seq(layers.Dense(5, name="d"), layers.BatchNormalization(name="bn"))
    (finding,) = bnseq.lint(model)
    assert (finding.code, finding.layer, finding.producer) == ("BN001", "bn", "d")
    assert finding.message == (
        "Dense 'd' adds a bias that BatchNormalization 'bn' subtracts again (5 "
        "parameters wasted). Write `Dense(..., use_bias=False)`, or let "
        "bnseq.Sequential(batch_norm=True) do it."
    )
    assert str(finding) == f"bn: BN001 {finding.message}"


def test_bn001_after_a_nonlinear_producer_says_why_the_bias_is_redundant():
    model = seq(layers.Dense(5, activation="relu", name="d"), layers.BatchNormalization(name="bn"))
    bn001, bn002 = bnseq.lint(model)
    assert bn001.message == (
        "Dense 'd' adds a bias that is redundant once BatchNormalization 'bn' moves before the "
        "activation, where its `beta` does the bias's job (5 parameters wasted). Write "
        "`Dense(..., use_bias=False)`, or let bnseq.Sequential(batch_norm=True) do it."
    )
    assert bn002.code == "BN002"


def test_bn001_near_miss_no_bias():
    assert codes(seq(layers.Dense(5, use_bias=False), layers.BatchNormalization())) == []


def test_bn001_counts_a_depthwise_bias():
    model = seq(
        layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
        layers.BatchNormalization(name="bn"),
        shape=(6, 6, 3),
    )
    (finding,) = bnseq.lint(model)
    assert "(6 parameters wasted)" in finding.message


# BN002 ----------------------------------------------------------------------


def test_bn002_after_the_producers_own_activation():
    model = seq(
        layers.Dense(5, use_bias=False, activation="relu", name="d"),
        layers.BatchNormalization(name="bn"),
    )
    assert codes(model) == [("BN002", "bn")]


@pytest.mark.parametrize(
    "activation",
    [
        layers.Activation("tanh"),
        layers.ReLU(),
        layers.LeakyReLU(),
        layers.PReLU(),
        layers.ELU(),
        layers.Softmax(),
    ],
)
def test_bn002_after_an_activation_layer(activation):
    model = seq(layers.Dense(5, use_bias=False), activation, layers.BatchNormalization(name="bn"))
    assert codes(model) == [("BN002", "bn")]


def test_bn002_near_miss_linear_activation_layer():
    model = seq(
        layers.Dense(5, use_bias=False),
        layers.Activation("linear"),
        layers.BatchNormalization(),
    )
    assert codes(model) == []


# BN003 ----------------------------------------------------------------------


def test_bn003_wrong_axis_after_channels_first():
    model = seq(
        layers.Conv2D(4, 3, use_bias=False, data_format="channels_first", name="c"),
        layers.BatchNormalization(name="bn"),
        shape=(3, 8, 8),
    )
    (finding,) = bnseq.lint(model)
    assert finding.code == "BN003"
    assert "Write `BatchNormalization(axis=1)`" in finding.message


def test_bn003_wrong_axis_after_dense_on_a_sequence():
    model = seq(
        layers.Dense(4, use_bias=False), layers.BatchNormalization(axis=1, name="bn"), shape=(5, 3)
    )
    assert codes(model) == [("BN003", "bn")]


@pytest.mark.parametrize("axis", [1, -3])
def test_bn003_near_miss_right_axis(axis):
    model = seq(
        layers.Conv2D(4, 3, use_bias=False, data_format="channels_first"),
        layers.BatchNormalization(axis=axis),
        shape=(3, 8, 8),
    )
    assert codes(model) == []


# Not findings ------------------------------------------------------------------


def test_batch_norm_after_merge_pooling_or_input_is_not_a_finding():
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    b = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    merged = layers.BatchNormalization()(layers.Add()([a, b]))
    pooled = layers.BatchNormalization()(layers.MaxPooling2D()(merged))
    first = layers.BatchNormalization()(inputs)
    model = keras.Model(inputs, [pooled, first])
    assert codes(model) == []


def test_all_three_at_once_and_in_model_order():
    model = seq(
        layers.Conv2D(4, 3, activation="relu", data_format="channels_first", name="c"),
        layers.BatchNormalization(name="bn1"),
        layers.Flatten(),
        layers.Dense(3, name="d"),
        layers.BatchNormalization(name="bn2"),
        shape=(3, 8, 8),
    )
    assert codes(model) == [("BN001", "bn1"), ("BN002", "bn1"), ("BN003", "bn1"), ("BN001", "bn2")]


# Kinds of model ------------------------------------------------------------------


def test_functional_model():
    inputs = keras.Input((4,))
    x = layers.Dense(3, activation="relu", name="d")(inputs)
    outputs = layers.BatchNormalization(name="bn")(x)
    assert codes(keras.Model(inputs, outputs)) == [("BN001", "bn"), ("BN002", "bn")]


def test_nested_model_is_judged_by_the_real_producer():
    inner = keras.Sequential([keras.Input((3,)), layers.BatchNormalization(name="inner_bn")])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, inner(layers.Dense(3, name="d")(inputs)))
    assert codes(model) == [("BN001", "inner_bn")]


def test_bnseq_sequential_is_clean():
    model = bnseq.Sequential(
        [keras.Input((3, 8, 8)), layers.Conv2D(4, 3, activation="relu", data_format="channels_first")],
        batch_norm=True,
    )
    assert codes(model) == []


def test_keras_file(tmp_path):
    path = tmp_path / "model.keras"
    seq(layers.Dense(5), layers.BatchNormalization(name="bn")).save(path)
    assert codes(str(path)) == [("BN001", "bn")]
    assert codes(path) == [("BN001", "bn")]


def test_lint_does_not_change_the_model():
    model = seq(layers.Dense(5, activation="relu"), layers.BatchNormalization())
    before = [layer.get_config() for layer in model.layers]
    bnseq.lint(model)
    assert [layer.get_config() for layer in model.layers] == before


def test_lint_error_for_a_wrong_argument():
    with pytest.raises(TypeError, match=re.escape("Received: [] (of type list)")):
        bnseq.lint([])


def test_warnings_and_lint_use_the_same_rules():
    stack = [layers.Dense(5, activation="relu", name="d")]
    model = bnseq.Sequential([keras.Input((4,)), *stack])
    with pytest.warns(bnseq.BatchNormPlacementWarning) as record:
        model.add(layers.BatchNormalization(name="bn"))
    assert [str(w.message) for w in record] == [f.message for f in bnseq.lint(model)]


# keras.applications ------------------------------------------------------------


# Reading a model is the same code on every backend; what differs is the cost of building one: on JAX
# each new weight shape compiles its random initializer (61 s for these five models, 3.7 s on TensorFlow,
# measured). TensorFlow's legs read all five, the JAX and PyTorch legs MobileNetV2 and ResNet50.
WIDELY_USED = ["MobileNetV2", "Xception", "EfficientNetB0", "InceptionV3"]
if keras.backend.backend() != "tensorflow":
    WIDELY_USED = ["MobileNetV2"]


class _Applications(dict):
    """keras.applications models by name, each built when first asked for."""

    def __missing__(self, name):
        self[name] = getattr(keras.applications, name)(weights=None)
        return self[name]


@pytest.fixture(scope="module")
def applications():
    return _Applications()


@pytest.mark.parametrize("name", WIDELY_USED)
def test_widely_used_architectures_have_no_findings(applications, name):
    assert bnseq.lint(applications[name]) == []


def test_resnet50_has_one_bn001_per_batch_norm(applications):
    model = applications["ResNet50"]
    findings = bnseq.lint(model)
    batch_norms = [layer.name for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    assert len(batch_norms) == 53
    assert [f.code for f in findings] == ["BN001"] * 53
    assert [f.layer for f in findings] == batch_norms


def test_bn004_in_a_functional_model():
    inputs = keras.Input((4,))
    x = layers.BatchNormalization(name="a")(layers.Dense(3, use_bias=False, name="d")(inputs))
    model = keras.Model(inputs, layers.BatchNormalization(name="b")(x))
    (finding,) = bnseq.lint(model)
    assert (finding.code, finding.layer, finding.producer) == ("BN004", "b", "a")
    assert finding.message == (
        "BatchNormalization 'b' directly follows BatchNormalization 'a', whose output is already "
        "normalized; the second one only adds parameters and computation. Keep one of them."
    )


# BN001 only where the bias is wasted ------------------------------------------


def test_no_bn001_when_the_output_also_feeds_another_layer():
    inputs = keras.Input((4,))
    hidden = layers.Dense(6, name="d")(inputs)
    normalized = layers.BatchNormalization(name="bn")(hidden)
    skipped = layers.Dense(6, name="skip")(hidden)  # sees the bias
    model = keras.Model(inputs, layers.Add()([normalized, skipped]))
    assert codes(model) == []


def test_no_bn001_when_the_output_is_also_a_model_output():
    inputs = keras.Input((8, 8, 3))
    features = layers.Conv2D(4, 3, name="c")(inputs)
    normalized = layers.BatchNormalization(name="bn")(features)
    assert codes(keras.Model(inputs, [normalized, features])) == []


def test_bn001_when_every_user_normalizes():
    inputs = keras.Input((4,))
    hidden = layers.Dense(6, name="d")(inputs)
    first = layers.BatchNormalization(name="bn1")(hidden)
    second = layers.BatchNormalization(name="bn2")(hidden)
    model = keras.Model(inputs, [first, second])
    assert codes(model) == [("BN001", "bn1"), ("BN001", "bn2")]


# BN003 through merges, pooling and Permute ------------------------------------


def test_bn003_after_a_merge_of_channels_first_convolutions():
    inputs = keras.Input((3, 7, 7))
    a = layers.Conv2D(4, 3, data_format="channels_first", use_bias=False, name="a")(inputs)
    b = layers.Conv2D(4, 3, data_format="channels_first", use_bias=False, name="b")(inputs)
    wrong = layers.BatchNormalization(name="wrong")(layers.Add(name="add")([a, b]))  # axis -1: the width
    right = layers.BatchNormalization(axis=1, name="right")(layers.Concatenate(axis=1)([a, b]))
    findings = bnseq.lint(keras.Model(inputs, [wrong, right]))
    assert [(f.code, f.layer, f.producer) for f in findings] == [("BN003", "wrong", "add")]
    assert findings[0].message == (
        "BatchNormalization 'wrong' normalizes axis -1, but the channels of its input are on axis 1 (read "
        "through Add 'add' and the layers before it). Write `BatchNormalization(axis=1)`."
    )


def test_bn003_after_pooling_and_permute_and_none_where_unknown():
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(4, 3, use_bias=False)(inputs)
    pooled = layers.BatchNormalization(axis=1, name="pooled")(layers.MaxPooling2D()(x))
    permuted = layers.BatchNormalization(axis=-1, name="permuted")(layers.Permute((3, 1, 2))(x))
    unknown = layers.BatchNormalization(axis=1, name="unknown")(layers.Lambda(lambda t: t + 1.0)(x))
    findings = bnseq.lint(keras.Model(inputs, [pooled, permuted, unknown]))
    assert [(f.code, f.layer) for f in findings] == [("BN003", "pooled"), ("BN003", "permuted")]
