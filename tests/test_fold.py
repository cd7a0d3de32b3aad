"""bnseq.fold: the folded model computes what the original computes, in inference."""

import re
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import probes
from bnseq.changing.folding import probe_difference
from bnseq.deciding.fold_math import batch_norm_affine
from bnseq.deciding.fold_math import folded_weights
from bnseq.deciding.fold_math import scale_kernel
from bnseq.probes import infer


def rng(seed=0):
    """A fresh generator: each test draws its own numbers, whatever ran before."""
    return np.random.default_rng(seed)


def randomize_statistics(model, generator=None, signed=False):
    """Non-trivial BatchNormalization statistics and affine parameters; gamma of both signs with `signed`."""
    generator = generator or rng(0)
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(generator.normal(0, 0.5, channels))
            layer.moving_variance.assign(generator.uniform(0.3, 2.0, channels))
            if layer.scale:
                gamma = generator.uniform(0.5, 1.5, channels)
                layer.gamma.assign(gamma * generator.choice([-1.0, 1.0], channels) if signed else gamma)
            if layer.center:
                layer.beta.assign(generator.normal(0, 0.5, channels))
    return model


def relative_error(model, folded, x):
    """Largest difference relative to the largest output, in inference.

    Both calls go through `probes.infer`: compiled by XLA on a CPU whose
    TensorFlow has no channels_first kernels, eager everywhere else.
    """
    expected = infer(model, x)
    actual = infer(folded, x)
    return float(np.max(np.abs(expected - actual)) / np.max(np.abs(expected)))


def single(layer, input_shape, batch_norm_kwargs=None, bias=False):
    """Input -> layer -> BatchNormalization on its channel axis -> ReLU."""
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            layer,
            layers.BatchNormalization(
                axis=bnseq.kinds.channel_axis(layer), **(batch_norm_kwargs or {})
            ),
            layers.ReLU(),
        ]
    )
    if bias:  # a non-zero bias, to check `s * (bias - mean) + beta`
        layer.bias.assign(rng(1).normal(size=layer.bias.shape))
    return randomize_statistics(model)


CF, CL = "channels_first", "channels_last"
CASES = {
    "dense": (lambda f: layers.Dense(6), (5,)),
    "dense_sequence": (lambda f: layers.Dense(6), (3, 5)),
    "conv1d": (lambda f: layers.Conv1D(6, 3, strides=2, data_format=f), (4, 9)),
    "conv1d_dilated": (lambda f: layers.Conv1D(6, 3, dilation_rate=2, data_format=f), (4, 9)),
    "conv2d": (lambda f: layers.Conv2D(6, 3, strides=2, padding="same", data_format=f), (4, 7, 7)),
    "conv2d_groups": (lambda f: layers.Conv2D(6, 3, groups=2, data_format=f), (4, 6, 6)),
    "conv3d": (lambda f: layers.Conv3D(5, 2, data_format=f), (3, 4, 4, 4)),
    "conv1d_transpose": (lambda f: layers.Conv1DTranspose(6, 3, strides=2, data_format=f), (4, 5)),
    "conv2d_transpose": (lambda f: layers.Conv2DTranspose(6, 3, strides=2, data_format=f), (4, 5, 5)),
    "conv3d_transpose": (lambda f: layers.Conv3DTranspose(5, 2, data_format=f), (3, 3, 3, 3)),
    "depthwise1d": (lambda f: layers.DepthwiseConv1D(3, depth_multiplier=2, data_format=f), (4, 8)),
    "depthwise2d": (lambda f: layers.DepthwiseConv2D(3, depth_multiplier=3, strides=2, data_format=f), (4, 7, 7)),
    "depthwise2d_m1": (lambda f: layers.DepthwiseConv2D(3, data_format=f), (4, 7, 7)),
    "separable1d": (lambda f: layers.SeparableConv1D(6, 3, depth_multiplier=2, data_format=f), (4, 9)),
    "separable2d": (lambda f: layers.SeparableConv2D(6, 3, dilation_rate=2, data_format=f), (4, 8, 8)),
}


def _shape(shape, data_format):
    """`shape` is written channels first; move the channels for channels_last."""
    if data_format == CF or len(shape) == 1:
        return shape
    return (*shape[1:], shape[0])


@pytest.mark.parametrize("data_format", [CL, CF])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_every_layer_kind_and_data_format(case, data_format, use_bias):
    make, shape = CASES[case]
    layer = make(data_format)
    layer.use_bias = use_bias
    if case.startswith("dense"):
        shape = shape  # Dense has no data_format
    else:
        shape = _shape(shape, data_format)
    model = single(layer, shape, bias=use_bias)
    folded = bnseq.fold(model)
    assert [type(each).__name__ for each in folded.layers] == [type(layer).__name__, "ReLU"]
    # A ReLU layer stays: only `Activation` layers merge back into the layer.
    assert folded.layers[0].use_bias
    x = rng(2).normal(size=(3, *shape)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-5


@pytest.mark.parametrize(
    "options",
    [{"center": False}, {"scale": False}, {"center": False, "scale": False}, {"epsilon": 0.5}],
)
def test_batch_norm_options(options):
    model = single(layers.Conv2D(4, 3), (6, 6, 3), batch_norm_kwargs=options)
    folded = bnseq.fold(model)
    assert len(folded.layers) == 2
    assert relative_error(model, folded, rng(3).normal(size=(2, 6, 6, 3)).astype("float32")) <= 1e-5


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: layers.Conv2D(4, 3, padding="same", data_format=CF), (3, 5, 4)),
        (lambda: layers.Conv1D(4, 1, data_format=CF), (3, 4)),
        (lambda: layers.DepthwiseConv2D(3, padding="same", data_format=CF), (4, 6, 4)),
        (lambda: layers.Conv2DTranspose(5, 1, data_format=CF), (3, 2, 5)),
    ],
)
def test_channels_first_layer_whose_last_spatial_size_equals_its_channels(make, shape):
    """The hazard: TensorFlow's `ops.add` has put such biases on the last axis.

    Whatever the backend does, the folded model must compute what the original
    computes, in eager calls as well as in `predict`; where the backend
    misplaces the bias, the BatchNormalization is kept and says why.
    """
    model = single(make(), shape)
    layer = model.layers[0]
    assert layer.output.shape[1] == layer.output.shape[-1]
    folded = bnseq.fold(model)
    x = rng(4).normal(size=(2, *shape)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-5
    jit_compile = bnseq.probes.needs_xla(model)  # True where TF has no NCHW kernels
    for each in (model, folded):
        each.compile(jit_compile=jit_compile)
    np.testing.assert_allclose(
        folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    (decision,) = bnseq.fold_report(model)
    assert decision.folded or decision.reason == hazard_reason(layer)


@pytest.mark.parametrize("sound", [True, False])
def test_bias_hazard_decision_follows_the_backend(sound):
    """Both answers of the backend probe, forced: fold where sound, keep (and say why) where not."""
    model = single(layers.Conv2D(4, 3, padding="same", data_format=CF), (3, 5, 4))
    with mock.patch("bnseq.probes.bias_add_is_sound", return_value=sound):
        (decision,) = bnseq.fold_report(model)
        folded = bnseq.fold(model)
    assert decision.folded is sound
    assert decision.reason == ("" if sound else hazard_reason(model.layers[0]))
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert kinds == (["Conv2D", "ReLU"] if sound else ["Conv2D", "BatchNormalization", "ReLU"])


def hazard_reason(layer):
    return (
        f"{type(layer).__name__} '{layer.name}' is channels_first with as many channels as its "
        "last spatial size, where this Keras backend adds a bias along the last axis in eager "
        "calls; folding would change the outputs"
    )


def test_fold_math_matches_batch_normalization():
    """The affine map of a BatchNormalization, against Keras's own layer."""
    bn = layers.BatchNormalization(epsilon=0.01)
    bn.build((None, 3))
    randomize_statistics(keras.Sequential([keras.Input((3,)), bn]))
    x = rng(5).normal(size=(4, 3))
    scale, shift = batch_norm_affine(
        bn.moving_mean.numpy(), bn.moving_variance.numpy(), 0.01, bn.gamma.numpy(), bn.beta.numpy()
    )
    expected = keras.ops.convert_to_numpy(bn(x.astype("float32"), training=False))
    np.testing.assert_allclose(x * scale + shift, expected, rtol=1e-5, atol=1e-6)


def test_depthwise_output_channel_order():
    """Output channel `c * multiplier + m` is kernel entry `[..., c, m]`."""
    kernel = np.ones((1, 2, 3))
    scaled = scale_kernel(kernel, np.arange(6.0), "depthwise")
    assert scaled[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match=re.escape("Unknown kernel layout. Received: layout='sideways'")):
        scale_kernel(kernel, np.ones(6), "sideways")


def test_folded_weights_keep_the_variable_dtype():
    model = single(layers.Dense(3, dtype="float64"), (4,))
    weights = folded_weights(model.layers[0], model.layers[1])
    # float64 where the backend stores it (JAX holds float32 unless x64 is enabled).
    kernel_dtype = model.layers[0].get_weights()[0].dtype
    assert [w.dtype for w in weights] == [kernel_dtype, kernel_dtype]


def test_trained_bnseq_model():
    model = bnseq.Sequential(
        [
            keras.Input((8, 8, 2)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(5, activation="relu"),
            layers.Dense(2),
        ],
        batch_norm={"momentum": 0.5},
    )
    x = rng(6).normal(size=(32, 8, 8, 2)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, rng(7).normal(size=(32, 2)), epochs=3, batch_size=8, verbose=0)
    weights = [w.copy() for w in model.get_weights()]
    folded = bnseq.fold(model)
    assert type(folded) is keras.Sequential
    assert [type(layer).__name__ for layer in folded.layers] == ["Conv2D", "Flatten", "Dense", "Dense"]
    assert [layer.get_config()["activation"] for layer in folded.layers[::2]] == ["relu", "relu"]
    assert relative_error(model, folded, x) <= 1e-5
    for before, after in zip(weights, model.get_weights()):  # original untouched
        np.testing.assert_array_equal(before, after)
    assert len(model.layers) == 9


def test_nested_models_fold_and_result_is_plain_keras(tmp_path):
    inner = bnseq.Sequential(
        [keras.Input((6,)), layers.Dense(4, activation="relu")], batch_norm=True, name="inner"
    )
    inputs = keras.Input((5,))
    x = layers.Dense(6, use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    model = keras.Model(inputs, inner(x))
    randomize_statistics(model)
    folded = bnseq.fold(model)
    kinds = [type(layer) for layer in folded._flatten_layers()]
    assert layers.BatchNormalization not in kinds
    assert bnseq.Sequential not in kinds
    assert all(kind.__module__.startswith("keras.") for kind in kinds)
    assert relative_error(model, folded, rng(8).normal(size=(3, 5)).astype("float32")) <= 1e-5

    # Loadable where bnseq cannot be imported.
    path = tmp_path / "folded.keras"
    folded.save(path)
    script = (
        "import sys; sys.modules['bnseq'] = None\n"
        "import keras\n"
        f"model = keras.saving.load_model({str(path)!r})\n"
        "print(len(model.layers))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(len(folded.layers))


def test_shared_layers_and_model_outputs_stay_correct():
    inputs = keras.Input((4,))
    dense = layers.Dense(4, use_bias=False, name="d")
    bn = layers.BatchNormalization(name="bn")
    y = dense(inputs)
    model = keras.Model(inputs, [bn(y), y])  # `d`'s output is also a model output
    randomize_statistics(model)
    report = bnseq.fold_report(model)
    assert [(d.batch_norm, d.folded) for d in report] == [("bn", False)]
    assert report[0].reason == "the output of Dense 'd' is also used elsewhere"
    folded = bnseq.fold(model)
    x = rng(9).normal(size=(2, 4)).astype("float32")
    for a, b in zip(model(x, training=False), folded(x, training=False)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-6)


def test_report_gives_each_reason():
    inputs = keras.Input((4, 4, 3))
    first = layers.BatchNormalization(name="first")(inputs)
    relu = layers.Conv2D(3, 3, padding="same", activation="relu", name="relu_conv")(first)
    after_act = layers.BatchNormalization(name="after_act")(relu)
    pooled = layers.BatchNormalization(name="after_pool")(layers.MaxPooling2D(name="pool")(after_act))
    wrong = layers.Conv2D(3, 1, name="conv")(pooled)
    wrong_axis = layers.BatchNormalization(axis=1, name="wrong_axis")(wrong)
    a = layers.Conv2D(3, 1, name="a")(wrong_axis)
    b = layers.Conv2D(3, 1, name="b")(wrong_axis)
    merged = layers.BatchNormalization(name="merged")(layers.Add(name="add")([a, b]))
    ok = layers.BatchNormalization(name="ok")(layers.Conv2D(3, 1, name="c")(merged))
    model = keras.Model(inputs, ok)
    assert [str(decision) for decision in bnseq.fold_report(model)] == [
        "first: kept, it takes a model input; nor forward: Conv2D 'relu_conv' pads its input ('same') with a "
        "kernel larger than 1, where the shift would not reach the padded border",
        "after_act: kept, Conv2D 'relu_conv' applies its activation before it; only a linear "
        "layer with the identity activation folds",
        "after_pool: folded forward into conv",
        "wrong_axis: kept, its axis 1 is not the channel axis of Conv2D 'conv'",
        "merged: split across Add 'add' and folded into a, b",
        "ok: folded into c",
    ]
    randomize_statistics(model)
    folded = bnseq.fold(model)
    assert sum(isinstance(layer, layers.BatchNormalization) for layer in folded.layers) == 3
    x = rng(10).normal(size=(2, 4, 4, 3)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-5

    with pytest.raises(ValueError) as error:
        bnseq.fold(model, strict=True)
    assert str(error.value) == (
        f"3 BatchNormalization layer(s) of model '{model.name}' cannot be folded:\n"
        "- first: kept, it takes a model input; nor forward: Conv2D 'relu_conv' pads its input ('same') "
        "with a kernel larger than 1, where the shift would not reach the padded border\n"
        "- after_act: kept, Conv2D 'relu_conv' applies its activation before it; only a "
        "linear layer with the identity activation folds\n"
        "- wrong_axis: kept, its axis 1 is not the channel axis of Conv2D 'conv'"
    )


def test_batch_norm_in_another_model_than_its_producer_folds_where_each_is_called_once():
    """0.5 kept it ("in a different model"); AIMET's nested-model fold test finds the fold exact."""
    inner = keras.Sequential([keras.Input((3,)), layers.BatchNormalization(name="inner_bn")])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, inner(layers.Dense(3, use_bias=False, name="d")(inputs)))
    randomize_statistics(model)
    folded, (decision,) = bnseq.fold_with_report(model)
    assert str(decision) == "inner_bn: folded into d"
    x = rng(3).normal(size=(5, 4)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-5


def test_errors():
    expected = "fold expects a keras.Model or the path of a .keras file. Received: model="
    with pytest.raises(TypeError, match=re.escape(expected)):
        bnseq.fold(layers.Dense(2))
    unbuilt = keras.Sequential([layers.Dense(2)], name="later")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Sequential 'later' is not built, so it has no weights or statistics to fold."
        ),
    ):
        bnseq.fold(unbuilt)


# All three on TensorFlow; MobileNetV2 (depthwise and pointwise folds) on JAX and PyTorch, where
# building each model compiles its random initializers shape by shape (ResNet50 and Xception: 30 s of
# the JAX leg). The fold is NumPy's on every backend; predict is the backend's.
APPLICATIONS = [("ResNet50", (64, 64, 3)), ("MobileNetV2", (64, 64, 3)), ("Xception", (75, 75, 3))]
if keras.backend.backend() != "tensorflow":
    APPLICATIONS = [("MobileNetV2", (64, 64, 3))]


@pytest.mark.parametrize("name, input_shape", APPLICATIONS)
def test_keras_applications(name, input_shape):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=input_shape, classes=10, classifier_activation=None
    )
    randomize_statistics(model, rng(1))
    report = bnseq.fold_report(model)
    assert report and all(decision.folded for decision in report)
    folded = bnseq.fold(model, strict=True)
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded.layers)
    x = np.random.default_rng(2).normal(size=(2, *input_shape)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-4


def test_folded_units_are_the_architecture_without_batch_norm():
    """Activation layers merge back: the folded model is the no-BN model."""
    stack = [
        layers.Conv2D(4, 3, activation="relu"),
        layers.DepthwiseConv2D(3, activation="tanh", activity_regularizer="l2"),
        layers.Flatten(),
        layers.Dense(5, activation=keras.activations.gelu),
        layers.Dense(3),
    ]
    model = randomize_statistics(
        bnseq.Sequential([keras.Input((9, 9, 2)), *stack], batch_norm=True)
    )
    folded = bnseq.fold(model)
    plain = keras.Sequential(
        [
            keras.Input((9, 9, 2)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.DepthwiseConv2D(3, activation="tanh", activity_regularizer="l2"),
            layers.Flatten(),
            layers.Dense(5, activation=keras.activations.gelu),
            layers.Dense(3),
        ]
    )

    def structure(m):
        return [
            {k: v for k, v in layer.get_config().items() if k not in ("name", "kernel_initializer")}
            for layer in m.layers
        ]

    assert structure(folded) == structure(plain)
    x = rng(11).normal(size=(2, 9, 9, 2)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-5


# Folding forward: a BatchNormalization after an activation into the linear layer after it ----------


def predicted(model, x):
    """`predict`, or, where this machine has no channels_first kernels, the same compiled by XLA."""
    if probes.needs_xla(model):
        return keras.ops.convert_to_numpy(infer(model, x))
    return model.predict(x, verbose=0)


def forward_model(kind, data_format="channels_last", padding="valid"):
    shape = (6, 6, 3) if data_format == "channels_last" else (3, 6, 6)
    axis = -1 if data_format == "channels_last" else 1
    inputs = keras.Input(shape)
    x = layers.Conv2D(4, 3, activation="relu", data_format=data_format, name="first")(inputs)
    x = layers.BatchNormalization(axis=axis, name="late")(x)
    if kind == "conv":
        x = layers.Conv2D(5, 1 if padding == "same" else 2, padding=padding, data_format=data_format, name="next")(x)
    elif kind == "depthwise":
        x = layers.DepthwiseConv2D(2, depth_multiplier=2, data_format=data_format, name="next")(x)
    else:
        x = layers.Dense(5, name="next")(x)
    x = layers.BatchNormalization(axis=axis, name="own")(x)  # folds back into `next` as well
    return keras.Model(inputs, layers.ReLU()(x))


@pytest.mark.parametrize(
    "kind, data_format, padding",
    [("conv", "channels_last", "valid"), ("conv", "channels_last", "same"), ("conv", "channels_first", "valid"),
     ("depthwise", "channels_last", "valid"), ("depthwise", "channels_first", "valid"),
     ("dense", "channels_last", "valid")],
)
def test_fold_forward_is_exact_under_predict(kind, data_format, padding):
    model = forward_model(kind, data_format, padding)
    randomize_statistics(model)
    folded, report = bnseq.fold_with_report(model)
    decisions = {d.batch_norm: str(d) for d in report}
    assert decisions["late"] == "late: folded forward into next"
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded.layers)
    x = rng(11).normal(size=(4, *model.input_shape[1:])).astype("float32")
    expected, actual = predicted(model, x), predicted(folded, x)
    assert np.max(np.abs(expected - actual)) <= 1e-5 * np.max(np.abs(expected))


def test_fold_forward_not_into_a_padding_conv_or_a_shared_output():
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="first")(inputs)
    late = layers.BatchNormalization(name="late")(x)
    padded = layers.Conv2D(4, 3, padding="same", name="padded")(late)
    model = keras.Model(inputs, padded)
    randomize_statistics(model)
    (decision,) = bnseq.fold_report(model)
    assert not decision.folded and "nor forward: Conv2D 'padded' pads its input ('same')" in decision.reason
    two = keras.Model(inputs, [layers.Dense(2, name="d")(late), late])  # `late` is also an output
    assert not bnseq.fold_report(two)[0].folded
    x = rng(12).normal(size=(2, 6, 6, 3)).astype("float32")
    assert relative_error(model, bnseq.fold(model), x) <= 1e-6


class OffsetDense(layers.Dense):
    """A Dense subclass with an `__init__` argument its config leaves out."""

    def __init__(self, units, offset=0.0, **kwargs):
        super().__init__(units, **kwargs)
        self.offset = offset

    def call(self, inputs):
        return super().call(inputs) + self.offset


def test_fold_never_recreates_a_subclass_or_a_quantized_layer():
    model = keras.Sequential([
        keras.Input((4,)), OffsetDense(3, offset=2.0, use_bias=False, name="sub"), layers.BatchNormalization(name="a"),
        layers.Dense(3, use_bias=False, name="q"), layers.BatchNormalization(name="b"),
    ])
    model.get_layer("q").quantize("int8")
    randomize_statistics(model)
    folded, report = bnseq.fold_with_report(model)
    reasons = {d.batch_norm: d.reason for d in report}
    assert "OffsetDense 'sub' cannot be re-created from its config: it is a subclass of Dense" in reasons["a"]
    assert "Dense 'q' cannot be re-created from its config: it is quantized (int8)" in reasons["b"]
    assert folded.get_layer("sub") is model.get_layer("sub")
    x = rng(13).normal(size=(4, 4)).astype("float32")
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


# Checked as predict runs it: TensorFlow's oneDNN fusion of conv + bias + add + LeakyReLU ------------


def conv_add_leaky(bias, slope=0.01, with_bn=False):
    image, other = keras.Input((6, 6, 3)), keras.Input((6, 6, 4))
    x = layers.Conv2D(4, 3, padding="same", use_bias=bias, name="conv")(image)
    if with_bn:
        x = layers.BatchNormalization(name="bn")(x)
    x = layers.LeakyReLU(slope, name="leaky")(layers.Add(name="add")([x, other]))
    model = keras.Model([image, other], x)
    if bias:
        model.get_layer("conv").bias.assign(rng(20).normal(size=4))
    return model


def test_the_fusion_probe_tells_what_plain_keras_computes_under_predict():
    model = conv_add_leaky(bias=True)
    x = [rng(21).normal(size=(2, 6, 6, 3)).astype("float32"), rng(22).normal(size=(2, 6, 6, 4)).astype("float32")]
    eager, compiled = infer(model, x), probes.predicted(model, x)
    wrong = float(np.max(np.abs(eager - compiled)) / np.max(np.abs(eager)))
    assert (wrong > 1e-2) == (not probes.leaky_relu_fusion_is_sound())
    without_bias = conv_add_leaky(bias=False)
    assert np.allclose(infer(without_bias, x), probes.predicted(without_bias, x), rtol=1e-5, atol=1e-5)


def test_fold_gives_a_model_whose_predict_is_right_where_the_fusion_is_wrong():
    model = conv_add_leaky(bias=False, with_bn=True)
    randomize_statistics(model)
    folded, report = bnseq.fold_with_report(model)
    (decision,) = report
    if probes.leaky_relu_fusion_is_sound():
        assert decision.folded
    else:
        assert not decision.folded and "TensorFlow with oneDNN fuses into one kernel" in decision.reason
    x = [rng(23).normal(size=(2, 6, 6, 3)).astype("float32"), rng(24).normal(size=(2, 6, 6, 4)).astype("float32")]
    expected = infer(model, x)
    for actual in (probes.predicted(folded, x), infer(folded, x)):
        assert float(np.max(np.abs(expected - actual)) / np.max(np.abs(expected))) <= 1e-5
    _, relative = probe_difference(model, folded)
    assert relative <= 1e-5


def test_probe_difference_sees_what_only_predict_gets_wrong():
    # The check itself: a folded model wrong only under predict is reported, not hidden by an eager call.
    model = conv_add_leaky(bias=False, with_bn=True)
    randomize_statistics(model)
    with mock.patch.object(probes, "leaky_relu_fusion_is_sound", return_value=True):
        forced = bnseq.fold(model)  # folds into the fused pattern regardless
    _, relative = probe_difference(model, forced)
    if probes.leaky_relu_fusion_is_sound():
        assert relative <= 1e-5
    else:
        assert relative > 1e-2
