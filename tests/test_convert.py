"""bnseq.batch_normalize: any model rewritten into the normalized form."""

import re

import keras
import numpy as np
import pytest
from keras import layers

import bnseq


def classes(model):
    return [type(layer).__name__ for layer in model.layers]


def configs(model):
    return [layer.get_config() for layer in model.layers]


def test_sequential():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(3, activation="relu", name="a"),
            layers.BatchNormalization(momentum=0.5, name="kept"),  # after the activation
            layers.Dense(3, name="b"),
            layers.Activation("tanh", name="t"),
            layers.BatchNormalization(epsilon=0.01, name="kept2"),
            layers.Dropout(0.1),
            layers.Dense(2, activation="softmax", name="c"),
        ]
    )
    before = configs(model)
    result = bnseq.batch_normalize(model, batch_norm={"momentum": 0.8})
    assert isinstance(result, bnseq.Sequential)
    assert result.batch_norm == {"momentum": 0.8}
    assert [layer.name for layer in result.layers] == [
        "a", "kept", "a_relu", "b", "kept2", "t", "dropout", "c", "c_bn", "c_softmax"
    ]
    a, kept, _, b, kept2, *_ = result.layers
    assert not a.use_bias and not b.use_bias
    assert kept.momentum == 0.5 and kept2.epsilon == 0.01  # options kept
    assert result.layers[8].momentum == 0.8  # new ones take batch_norm's
    assert bnseq.lint(result) == []
    assert result.output_shape == model.output_shape
    assert configs(model) == before  # the original is untouched
    assert configs(bnseq.batch_normalize(result)) == configs(result)  # idempotent


def test_wrong_axis_batch_norm_is_taken_over_on_the_right_axis():
    model = keras.Sequential(
        [
            keras.Input((3, 8, 8)),
            layers.Conv2D(4, 3, data_format="channels_first"),
            layers.BatchNormalization(name="bn"),
        ]
    )
    result = bnseq.batch_normalize(model)
    assert classes(result) == ["Conv2D", "BatchNormalization"]
    assert result.layers[1].axis == 1 and result.layers[1].name == "bn"
    assert bnseq.lint(result) == []


def branch_and_merge():
    inputs = keras.Input((8, 8, 3), name="image")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    a = layers.BatchNormalization(name="a_norm")(a)
    b = layers.Conv2D(4, 1, name="b")(inputs)
    b = layers.ReLU(name="b_relu")(b)
    b = layers.BatchNormalization(name="b_norm")(b)
    merged = layers.Add(name="merge")([a, b])
    pooled = layers.GlobalAveragePooling2D(name="pool")(merged)
    pooled = layers.BatchNormalization(name="pool_norm")(pooled)
    outputs = layers.Dense(3, name="logits")(pooled)
    return keras.Model(inputs, [outputs, merged], name="net")


def test_functional_with_a_branch_and_a_merge():
    model = branch_and_merge()
    before = configs(model)
    assert {f.code for f in bnseq.lint(model)} == {"BN001", "BN002"}
    result = bnseq.batch_normalize(model)
    assert not isinstance(result, keras.Sequential)
    assert result.name == "net"
    assert [t.shape for t in result.outputs] == [t.shape for t in model.outputs]
    assert [t.shape for t in result.inputs] == [t.shape for t in model.inputs]
    by_name = {layer.name: layer for layer in result.layers}
    graph = bnseq.reading.graph.walk(result)
    # a: Conv2D(no bias) -> a_norm -> Activation(relu); b: Conv2D -> b_norm -> ReLU.
    assert not by_name["a"].use_bias and not by_name["b"].use_bias
    assert graph.sole_producer(by_name["a_norm"]) is by_name["a"]
    assert type(graph.consumers(by_name["a_norm"])[0]).__name__ == "Activation"
    assert graph.sole_producer(by_name["b_norm"]) is by_name["b"]
    assert graph.sole_producer(by_name["b_relu"]) is by_name["b_norm"]
    assert graph.sole_producer(by_name["pool_norm"]) is by_name["pool"]  # left alone
    assert graph.sole_producer(by_name["logits_bn"]) is by_name["logits"]
    assert graph.producers(by_name["merge"])[1] is by_name["b_relu"]
    assert bnseq.lint(result) == []
    assert configs(model) == before
    assert configs(bnseq.batch_normalize(result)) == configs(result)
    x = np.zeros((2, 8, 8, 3), "float32")
    assert [o.shape for o in result(x)] == [(2, 3), (2, 8, 8, 4)]


def test_nested_models_are_rewritten():
    inner = keras.Sequential(
        [keras.Input((3,)), layers.Dense(3, activation="relu", name="inner_d")], name="inner"
    )
    inputs = keras.Input((4,))
    model = keras.Model(inputs, inner(layers.Dense(3, name="outer_d")(inputs)))
    result = bnseq.batch_normalize(model)
    new_inner = result.get_layer("inner")
    assert isinstance(new_inner, bnseq.Sequential)
    assert classes(new_inner) == ["Dense", "BatchNormalization", "Activation"]
    assert bnseq.lint(result) == []
    assert inner.layers[0].use_bias  # the original's nested model is untouched


def test_bnseq_sequential_result_is_unchanged_structure():
    model = bnseq.Sequential(
        [keras.Input((4,)), layers.Dense(3, activation="relu"), layers.Dense(2)],
        batch_norm=True,
    )
    assert configs(bnseq.batch_normalize(model)) == configs(model)


def test_unbuilt_sequential():
    model = keras.Sequential([layers.Dense(3, activation="relu")])
    result = bnseq.batch_normalize(model)
    assert classes(result) == ["Dense", "BatchNormalization", "Activation"]
    assert result(np.ones((2, 5), "float32")).shape == (2, 3)


def test_resnet50_result_lints_clean():
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=4)
    result = bnseq.batch_normalize(model)
    assert bnseq.lint(result) == []
    batch_norms = sum(isinstance(layer, layers.BatchNormalization) for layer in result.layers)
    assert batch_norms == 53 + 1  # every one kept, plus the classifier's
    assert result.output_shape == model.output_shape


def test_error_batch_norm_false():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "batch_normalize(batch_norm=False) would change nothing. Pass True or "
            "a dict of BatchNormalization options. Received: batch_norm=False"
        ),
    ):
        bnseq.batch_normalize(keras.Sequential([layers.Dense(2)]), batch_norm=False)


def test_error_not_a_model():
    expected = "batch_normalize expects a keras.Model or the path of a .keras file. Received: model="
    with pytest.raises(TypeError, match=re.escape(expected)):
        bnseq.batch_normalize(layers.Dense(2))


def test_error_subclassed_model():
    class Net(keras.Model):
        def call(self, x):
            return x

    message = "batch_normalize could not read Net 'net', a subclassed model: it holds no layer bnseq rewrites."
    with pytest.raises(TypeError, match=re.escape(message)):
        bnseq.batch_normalize(Net())


# A preserving rewrite: whatever the original normalized, data= keeps its predictions ---------------


def trained_like(model, seed):
    """Non-zero biases and stale, non-trivial statistics, as training leaves them."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.5, 1.0, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 3.0, channels))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0.0, 0.5, channels))
        elif getattr(layer, "use_bias", False) and getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 1.0, layer.bias.shape))
    return model


def predicted(model, x):
    if bnseq.probes.needs_xla(model):  # no channels_first kernels on this machine: XLA, as predict cannot
        return keras.ops.convert_to_numpy(bnseq.probes.infer(model, x))
    return model.predict(x, verbose=0)


def relative(model, other, x):
    expected, actual = predicted(model, x), predicted(other, x)
    return float(np.max(np.abs(expected - actual)) / np.max(np.abs(expected)))


STACKS = {
    "bias, BN, ReLU": lambda: [layers.Dense(8), layers.BatchNormalization(), layers.ReLU(), layers.Dense(3)],
    "Dense(relu), BN": lambda: [layers.Dense(8, activation="relu"), layers.BatchNormalization(), layers.Dense(3)],
    "Dense, ReLU layer, BN": lambda: [
        layers.Dense(8), layers.Activation("relu"), layers.BatchNormalization(), layers.Dense(3, activation="tanh")
    ],
    "two after activations": lambda: [
        layers.Dense(8, activation="relu"), layers.BatchNormalization(), layers.Dense(6, activation="elu"),
        layers.BatchNormalization(), layers.Dense(3),
    ],
    "after activation into one with its own": lambda: [
        layers.Dense(8, activation="sigmoid"), layers.BatchNormalization(), layers.Dense(6),
        layers.BatchNormalization(), layers.ReLU(), layers.Dense(2),
    ],
}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_batch_normalize_with_data_keeps_predictions_whatever_it_takes_over(stack):
    model = trained_like(keras.Sequential([keras.Input((5,)), *STACKS[stack]()]), 1)
    x = np.random.default_rng(2).normal(1.0, 2.0, size=(48, 5)).astype("float32")
    fixed = bnseq.batch_normalize(model, data=x, batch_size=16)
    assert bnseq.lint(fixed) == []
    assert relative(model, fixed, x) <= 1e-5
    # Data the calibration never saw: the rewrite is exact, not fitted.
    other = np.random.default_rng(3).normal(-1.0, 0.5, size=(16, 5)).astype("float32")
    assert relative(model, fixed, other) <= 1e-5


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_batch_normalize_convolutions_keeps_predictions(data_format):
    shape = (7, 7, 3) if data_format == "channels_last" else (3, 7, 7)
    axis = -1 if data_format == "channels_last" else 1
    inputs = keras.Input(shape)
    x = layers.Conv2D(4, 3, padding="same", data_format=data_format)(inputs)
    x = layers.BatchNormalization(axis=axis)(x)  # after a conv with a bias
    x = layers.LeakyReLU(0.2)(x)
    x = layers.Conv2D(4, 3, activation="relu", data_format=data_format)(x)
    x = layers.BatchNormalization(axis=axis)(x)  # after the activation, into a 1x1 conv
    # 6 output channels, not 5: a channels_first layer with as many channels as its last spatial size
    # gets its bias on the wrong axis where TensorFlow has no NCHW kernels (probes.bias_add_is_sound):
    # the original itself would compute wrongly.
    x = layers.Conv2D(6, 1, padding="same", data_format=data_format)(x)
    model = trained_like(keras.Model(inputs, x), 4)
    data = np.random.default_rng(5).normal(size=(12, *shape)).astype("float32")
    fixed = bnseq.batch_normalize(model, data=data, batch_size=5)
    assert bnseq.lint(fixed) == []
    assert relative(model, fixed, data) <= 1e-5


def test_without_data_a_taken_over_batch_norm_still_computes_what_it_did():
    # A bias before a BatchNormalization goes: the statistics move by it, the output stays.
    model = trained_like(keras.Sequential([keras.Input((5,)), layers.Dense(8), layers.BatchNormalization(),
                                           layers.ReLU()]), 6)
    fixed = bnseq.batch_normalize(model)
    x = np.random.default_rng(7).normal(size=(16, 5)).astype("float32")
    assert not fixed.layers[0].use_bias
    assert relative(model, fixed, x) <= 1e-5


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="ResNet50 on TensorFlow's legs only (13 s of initializer compiles on JAX); batch_normalize(data=) "
    "keeps predictions on every backend in tests/test_recalibrate.py",
)
def test_resnet50_with_conv_biases_keeps_its_predictions():
    model = trained_like(keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=5), 8)
    x = np.random.default_rng(9).normal(size=(8, 32, 32, 3)).astype("float32")
    fixed = bnseq.batch_normalize(model, data=x, batch_size=8)
    expected, actual = predicted(model, x), predicted(fixed, x)
    assert np.max(np.abs(expected - actual)) <= 1e-4 * np.max(np.abs(expected))
    assert (expected.argmax(-1) == actual.argmax(-1)).all()


def test_refuses_with_data_where_the_affine_map_cannot_move():
    model = trained_like(keras.Sequential([keras.Input((5,)), layers.Dense(8, activation="relu", name="d"),
                                           layers.BatchNormalization(name="late")]), 10)
    x = np.ones((4, 5), "float32")
    with pytest.raises(ValueError) as error:
        bnseq.batch_normalize(model, data=x)
    assert str(error.value).startswith(
        f"batch_normalize(data=...) cannot keep the predictions of model '{model.name}': BatchNormalization "
        "'late' normalizes the output of the activation of Dense 'd'"
    )
    assert "Leave `data` out" in str(error.value)
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="c")(inputs)
    x = layers.BatchNormalization(name="late")(x)
    padded = keras.Model(inputs, layers.Conv2D(2, 3, padding="same", name="p")(x))
    with pytest.raises(ValueError, match="Conv2D 'p' pads its input"):
        bnseq.batch_normalize(trained_like(padded, 11), data=np.ones((2, 6, 6, 3), "float32"))
    bnseq.batch_normalize(padded)  # without data it rewrites (the new statistics start afresh)


class ScaledDense(layers.Dense):
    """A Dense subclass whose config leaves out `factor`."""

    def __init__(self, units, factor=1.0, **kwargs):
        super().__init__(units, **kwargs)
        self.factor = factor

    def call(self, inputs):
        return super().call(inputs) * self.factor


def test_layers_it_cannot_recreate_are_kept_whole_with_a_warning():
    model = keras.Sequential([keras.Input((5,)), ScaledDense(4, factor=3.0, name="scaled"), layers.Dense(2)])
    x = np.random.default_rng(12).normal(size=(16, 5)).astype("float32")
    expected = "keeps ScaledDense .scaled. as it is.*a subclass of Dense"
    with pytest.warns(bnseq.BatchNormPlacementWarning, match=expected):
        fixed = bnseq.batch_normalize(model, data=x)
    assert fixed.get_layer("scaled") is model.get_layer("scaled")
    assert relative(model, fixed, x) <= 1e-6
    quantized = keras.Sequential([keras.Input((5,)), layers.Dense(4, name="q"), layers.Dense(2, name="plain")])
    quantized.get_layer("q").quantize("int8")
    with pytest.warns(bnseq.BatchNormPlacementWarning, match="keeps Dense 'q' as it is.*quantized \\(int8\\)"):
        fixed = bnseq.batch_normalize(quantized, data=x)
    assert relative(quantized, fixed, x) <= 1e-5
