"""`bnseq.quantize_aware`: linear layers trained for int8 with BatchNormalization folded, exported to LiteRT.

The unit's arithmetic is checked against a NumPy reference of the fold and of TensorFlow's FakeQuant
rounding (its nudged range), in inference and in training (batch statistics with the correction of
Jacob et al., and the moving statistics after `freeze_statistics_after`); the model against what it
promises (the source untouched, the report, the refusals, saving); the export against LiteRT itself.
The export tests run on TensorFlow; the rest on every backend.
"""

import os

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import probes
from bnseq.changing import quantized_layers

TENSORFLOW = keras.backend.backend() == "tensorflow"
needs_tensorflow = pytest.mark.skipif(not TENSORFLOW, reason="export goes through TensorFlow's converter")


def numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def fake_quant(x, low, high, narrow=False, axis=None):
    """TensorFlow's FakeQuantWithMinMaxVars in NumPy: the range nudged so that 0 is a level, then rounded."""
    x, low, high = np.asarray(x, np.float64), np.asarray(low, np.float64), np.asarray(high, np.float64)
    if axis is not None:  # per channel: ranges broadcast along `axis`
        shape = [1] * x.ndim
        shape[axis] = -1
        low, high = low.reshape(shape), high.reshape(shape)
    levels_low, levels_high = (1.0 if narrow else 0.0), 255.0
    scale = (high - low) / (levels_high - levels_low)
    zero = np.clip(np.round(levels_low - low / scale), levels_low, levels_high)
    nudged_low, nudged_high = (levels_low - zero) * scale, (levels_high - zero) * scale
    clamped = np.clip(x, nudged_low, nudged_high)
    return np.floor((clamped - nudged_low) / scale + 0.5) * scale + nudged_low


def weights_rounded(kernel, axis=None):
    """Symmetric int8 weights as LiteRT stores them: [-m, m] over 254 steps, per channel along `axis`."""
    if axis is None:
        limit = np.abs(kernel).max()
    else:
        limit = np.abs(kernel).max(axis=tuple(i for i in range(kernel.ndim) if i != axis % kernel.ndim))
    return fake_quant(kernel, -limit, limit, narrow=True, axis=None if axis is None else axis % kernel.ndim)


def assert_rounded_alike(actual, expected, step):
    """Equal, but where float32 and float64 round a value lying at a tie to neighbouring levels (rare)."""
    difference = np.abs(np.asarray(actual, np.float64) - expected)
    assert difference.max() <= step * (1 + 1e-4)
    assert np.mean(difference > 1e-5) <= 0.05  # a wrong fold or axis moves most values


def random_statistics(batch_norm, seed=0):
    rng = np.random.default_rng(seed)
    channels = batch_norm.gamma.shape[0]
    batch_norm.set_weights([
        rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels),  # gamma of both signs
        rng.normal(size=channels),
        rng.normal(size=channels),
        rng.uniform(0.5, 2.0, channels),
    ])


def unit_of(linear, shape, activation=None, seed=0, **options):
    unit = quantized_layers.QuantizedLinear(linear, layers.BatchNormalization(), activation, **options)
    unit.build((None, *shape))
    rng = np.random.default_rng(seed)
    linear.set_weights([rng.normal(size=w.shape) * 0.5 for w in linear.get_weights()])
    random_statistics(unit.batch_norm, seed)
    return unit


def plain_linear(unit, kernel, x):
    """The unit's linear op with `kernel` on `x`, as Keras's own layer of the same config computes it (no bias)."""
    config = unit.layer.get_config()
    config.update(use_bias=False, name="reference")
    layer = type(unit.layer).from_config(config)
    layer.build(x.shape)
    layer.set_weights([np.asarray(kernel, "float32")])
    return numpy(layer(x))


def affine(unit):
    bn = unit.batch_norm
    gamma, beta, mean, variance = (numpy(v) for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
    sigma = np.sqrt(variance + bn.epsilon)
    bias = numpy(unit.layer.bias) if unit.layer.use_bias else 0.0
    return gamma, beta, mean, sigma, bias


CASES = {
    "Dense": (lambda: layers.Dense(4), (5,), None),
    "Conv2D": (lambda: layers.Conv2D(4, 3, padding="same"), (5, 5, 3), -1),
    "Conv1D causal": (lambda: layers.Conv1D(4, 3, padding="causal", use_bias=False), (7, 3), -1),
    "Conv2DTranspose": (lambda: layers.Conv2DTranspose(4, 3, strides=2), (4, 4, 3), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inference_is_the_folded_kernel_rounded_per_channel_then_the_output_rounded(name):
    make, shape, axis = CASES[name]
    unit = unit_of(make(), shape, layers.ReLU())
    unit.output_range.minimum.assign(0.0)
    unit.output_range.maximum.assign(3.0)
    gamma, beta, mean, sigma, bias = affine(unit)
    kernel = numpy(unit.layer.kernel)
    scale = gamma / sigma
    folded = kernel * (scale[:, None] if name == "Conv2DTranspose" else scale)  # (*k, out, in) for transposed
    x = np.random.default_rng(1).normal(size=(3, *shape)).astype("float32")
    linear = plain_linear(unit, weights_rounded(folded, axis), x)
    expected = fake_quant(np.maximum(linear + beta + scale * (bias - mean), 0.0), 0.0, 3.0)
    actual = numpy(unit(x, training=False))
    assert_rounded_alike(actual, expected, 3.0 / 255)
    assert np.mean((actual > 0) & (actual < 3)) > 0.25  # not all clipped: the comparison says something


def test_depthwise_and_separable_kernels_are_rounded_per_output_channel():
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 3)).astype("float32")
    unit = unit_of(layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False), (5, 5, 3))
    unit.output_range.minimum.assign(-4.0)
    unit.output_range.maximum.assign(4.0)
    gamma, beta, mean, sigma, _ = affine(unit)
    scale = gamma / sigma
    kernel = numpy(unit.layer.kernel) * scale.reshape(3, 2)  # (3, 3, in, multiplier): channel c * 2 + m
    rounded = weights_rounded(kernel.reshape(3, 3, 1, 6), -1).reshape(3, 3, 3, 2)
    reference = layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)
    reference.build(x.shape)
    reference.set_weights([rounded.astype("float32")])
    expected = fake_quant(numpy(reference(x)) + beta - scale * mean, -4.0, 4.0)
    assert_rounded_alike(numpy(unit(x, training=False)), expected, 8.0 / 255)

    separable = unit_of(layers.SeparableConv2D(4, 3, use_bias=False), (5, 5, 3))
    for quantizer in (separable.output_range, separable.between):
        quantizer.minimum.assign(-4.0)
        quantizer.maximum.assign(4.0)
    gamma, beta, mean, sigma, _ = affine(separable)
    scale = gamma / sigma
    depthwise = weights_rounded(numpy(separable.layer.depthwise_kernel).reshape(3, 3, 1, 3), -1).reshape(3, 3, 3, 1)
    pointwise = weights_rounded(numpy(separable.layer.pointwise_kernel) * scale, -1)
    first = layers.DepthwiseConv2D(3, use_bias=False)
    first.build(x.shape)
    first.set_weights([depthwise.astype("float32")])
    inner = fake_quant(numpy(first(x)), -4.0, 4.0)  # the depthwise output is a tensor of its own in LiteRT
    outputs = np.einsum("bhwc,co->bhwo", inner, pointwise[0, 0])
    expected = fake_quant(outputs + beta - scale * mean, -4.0, 4.0)
    assert_rounded_alike(numpy(separable(x, training=False)), expected, 8.0 / 255)


def test_training_normalizes_with_the_batch_through_the_correction_and_moves_the_statistics():
    unit = unit_of(layers.Conv2D(4, 3, use_bias=True), (5, 5, 3), layers.ReLU())
    gamma, beta, mean, sigma, bias = affine(unit)
    momentum = unit.batch_norm.momentum
    x = np.random.default_rng(2).normal(size=(6, 5, 5, 3)).astype("float32")
    kernel = numpy(unit.layer.kernel)
    plain = plain_linear(unit, kernel, x)
    batch_mean, batch_variance = plain.mean(axis=(0, 1, 2)), plain.var(axis=(0, 1, 2))
    batch_sigma = np.sqrt(batch_variance + unit.batch_norm.epsilon)
    rounded = weights_rounded(kernel * gamma / sigma, -1)
    corrected = plain_linear(unit, rounded, x) * sigma / batch_sigma + beta - gamma * batch_mean / batch_sigma
    activated = np.maximum(corrected, 0.0)
    expected = fake_quant(activated, 0.0, activated.max())  # the first batch sets the range
    actual = numpy(unit(x, training=True))
    assert_rounded_alike(actual, expected, activated.max() / 255)
    # Without rounding, that is exactly the BatchNormalization's training output.
    exact = np.maximum(gamma * (plain - batch_mean) / batch_sigma + beta, 0.0)
    assert np.max(np.abs(actual - exact)) <= 4 * activated.max() / 255
    np.testing.assert_allclose(
        numpy(unit.batch_norm.moving_mean), mean * momentum + (batch_mean + bias) * (1 - momentum), rtol=1e-5, atol=1e-6
    )
    variance = sigma**2 - unit.batch_norm.epsilon
    np.testing.assert_allclose(
        numpy(unit.batch_norm.moving_variance), variance * momentum + batch_variance * (1 - momentum), rtol=1e-5
    )


def test_after_freeze_statistics_after_steps_training_computes_what_inference_computes():
    unit = unit_of(layers.Conv2D(4, 3), (5, 5, 3), layers.ReLU(), freeze_statistics_after=2)
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(4, 5, 5, 3)).astype("float32") for _ in range(4)]
    states = []
    for batch in batches:
        training = numpy(unit(batch, training=True))
        states.append([numpy(unit.batch_norm.moving_mean), numpy(unit.batch_norm.moving_variance)])
        inference = numpy(unit(batch, training=False))
        states[-1].append(np.array_equal(training, inference))
    assert not np.array_equal(states[0][0], states[1][0])  # the first two steps move the statistics
    for before, after in zip(states[1:], states[2:]):  # then they hold, bit for bit
        assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert [state[2] for state in states] == [False, False, True, True]


def small_model():
    inputs = keras.Input((6, 6, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    y = layers.BatchNormalization(name="depthwise_bn")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.GlobalAveragePooling2D(name="average")(x)
    x = layers.Dropout(0.1, name="dropout")(x)
    outputs = layers.Dense(3, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs)
    for name in ("bn", "depthwise_bn"):
        random_statistics(model.get_layer(name))
    return model


def test_the_report_says_what_became_of_each_layer():
    qat, report = bnseq.quantize_aware_with_report(small_model())
    assert [str(decision) for decision in report.decisions] == [
        "image: int8 Input, its output range learned",
        "conv: int8 Conv2D, bn folded in, then relu",
        "bn: folded into conv",
        "relu: fused into conv",
        "depthwise: int8 DepthwiseConv2D, depthwise_bn folded in",
        "depthwise_bn: folded into depthwise",
        "add: int8 Add, its output range learned",
        "pool: int8 MaxPooling2D, on its input's range",
        "average: int8 GlobalAveragePooling2D, its output range learned",
        "dropout: int8 Dropout, on its input's range",
        "classes: int8 Dense, then softmax",
    ]
    assert report.units == ["conv", "depthwise", "classes"] and report.folded == ["bn", "depthwise_bn"]
    assert qat.quantize_aware_report is report and not report.float_layers
    assert [type(layer).__name__ for layer in qat.layers] == [
        "InputLayer", "ActivationQuantizer", "QuantizedLinear", "QuantizedLinear", "Add", "ActivationQuantizer",
        "MaxPooling2D", "GlobalAveragePooling2D", "ActivationQuantizer", "Dropout", "QuantizedLinear",
    ]
    classes = qat.get_layer("classes")
    assert classes.output_range.fixed_range == (0.0, 255 / 256) and classes.input_range is not None
    assert qat.get_layer("conv").input_range is None  # ReLU is fused into LiteRT's CONV_2D


def test_training_leaves_the_source_model_as_it_was_and_the_model_saves(tmp_path):
    model = small_model()
    before = [numpy(variable) for variable in model.variables]
    qat = bnseq.quantize_aware(model, freeze_statistics_after=3)
    x = np.random.default_rng(4).normal(size=(32, 6, 6, 3)).astype("float32")
    y = np.random.default_rng(5).integers(0, 3, 32)
    qat.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    history = qat.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.array_equal(a, numpy(b)) for a, b in zip(before, model.variables))
    unit = qat.get_layer("conv")
    assert numpy(unit.steps) == 8 and numpy(unit.output_range.seen) == 8
    assert not np.array_equal(numpy(unit.batch_norm.moving_mean), before[[v.path for v in model.variables].index(
        model.get_layer("bn").moving_mean.path)])
    path = str(tmp_path / "qat.keras")
    qat.save(path)
    loaded = keras.saving.load_model(path)
    assert np.array_equal(probes.predicted(loaded, x), probes.predicted(qat, x))


def test_layers_it_does_not_train_stay_float_and_are_listed_or_refused():
    inputs = keras.Input((5, 3))
    x = layers.Conv1D(4, 3, padding="same", name="conv")(inputs)
    x = layers.LSTM(4, name="lstm")(x)
    model = keras.Model(inputs, layers.Dense(2, name="out")(x))
    qat, report = bnseq.quantize_aware_with_report(model)
    assert [str(each) for each in report.float_layers] == [
        "lstm: float LSTM, a recurrent layer, which bnseq does not train for int8"
    ]
    assert isinstance(qat.get_layer("lstm"), layers.LSTM) and qat.get_layer("lstm") is not model.get_layer("lstm")
    assert isinstance(qat.get_layer("lstm_quantizer"), bnseq.ActivationQuantizer)  # what follows is int8
    with pytest.raises(ValueError, match=r"1 layer\(s\) of model '.*' would stay float in int8 LiteRT:\n- lstm: "
                                          r"float LSTM, a recurrent layer"):
        bnseq.quantize_aware(model, strict=True)


def test_errors():
    with pytest.raises(ValueError, match="holds no layer quantize_aware trains for int8"):
        bnseq.quantize_aware(keras.Sequential([keras.Input((3,)), layers.ReLU()]))
    with pytest.raises(ValueError, match="is not built"):
        bnseq.quantize_aware(keras.Sequential([layers.Dense(2)]))
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    for wrong in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"Received: freeze_statistics_after={wrong!r}"):
            bnseq.quantize_aware(model, freeze_statistics_after=wrong)
    with pytest.raises(ValueError, match="Received: momentum=1.0"):
        bnseq.quantize_aware(model, momentum=1.0)
    with pytest.raises(ValueError, match=r"Received: fixed_range=\(0.5, 1.0\)"):
        bnseq.ActivationQuantizer(fixed_range=(0.5, 1.0))
    with pytest.raises(ValueError, match="applies its own activation; pass it as activation="):
        bnseq.QuantizedLinear(layers.Dense(2, activation="relu"))
    with pytest.raises(TypeError, match="QuantizedLinear holds one of Dense"):
        bnseq.QuantizedLinear(layers.Conv3D(2, 1))


class Scaled(keras.layers.Layer):  # weights, and an __init__ argument Keras cannot put in a config
    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.factor = table["factor"]

    def build(self, shape):
        self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale * self.factor


def test_a_layer_with_weights_that_cannot_be_copied_is_refused_naming_it():
    inputs = keras.Input((4,))
    scaled = Scaled({"factor": np.float32(2.0), "source": object()}, name="scaled")
    model = keras.Model(inputs, layers.Dense(2)(scaled(inputs)))
    with pytest.raises(ValueError, match=r"Scaled 'scaled' cannot be re-created from its config"):
        bnseq.quantize_aware(model)


def trained(model, epochs=2, seed=6):
    qat = bnseq.quantize_aware(model, freeze_statistics_after=4)
    x = np.random.default_rng(seed).normal(size=(48, *model.inputs[0].shape[1:])).astype("float32")
    y = np.random.default_rng(seed + 1).integers(0, 3, 48)
    qat.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=epochs, batch_size=8, verbose=0)
    return qat, x


@needs_tensorflow
def test_litert_runs_every_linear_op_in_int8_from_the_learned_ranges(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from bnseq.exporting import runtimes

    qat, x = trained(small_model())
    path = str(tmp_path / "qat.tflite")
    report = bnseq.export(qat, path, data=x)
    quantization = report.quantization
    assert quantization.aware and quantization.float_operators == () and report.folded == 2 and report.kept == 0
    assert quantization.agreement == 1.0 and quantization.steps <= 2 and quantization.mean_rel < 1e-2
    operators = runtimes._operators(path)
    linear = [op for op in operators if op[0] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert sorted(op[0] for op in linear) == ["CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"]
    assert all(op[1][:2] == ["int8", "int8"] and op[2] == ["int8"] for op in linear)
    assert not [op for op in operators if op[0] == "MUL"]  # nothing left of the BatchNormalization layers
    assert "against the quantize-aware model: top-1 agreement 1.0000" in str(report)
    assert "operators computing in float: none" in str(report)
    # The command line exports a saved quantize-aware model the same way: no --quantize, no --data.
    from bnseq import cli

    qat.save(str(tmp_path / "qat.keras"))
    assert cli.main(["export", str(tmp_path / "qat.keras"), str(tmp_path / "from_cli.tflite")]) == 0
    assert (tmp_path / "from_cli.tflite").exists()


@needs_tensorflow
def test_litert_names_what_stays_float(tmp_path):
    pytest.importorskip("ai_edge_litert")
    inputs = keras.Input((5, 3))
    x = layers.Conv1D(4, 3, padding="same", name="conv")(inputs)
    x = layers.LSTM(4, unroll=True, name="lstm")(x)  # unrolled: LiteRT runs it without Flex ops
    qat, x = trained(keras.Model(inputs, layers.Dense(3, activation="softmax", name="out")(x)), epochs=1)
    report = bnseq.export(qat, str(tmp_path / "qat.tflite"), data=x)
    assert report.quantization.float_operators and report.quantization.agreement >= 0.97


@needs_tensorflow
def test_onnx_carries_the_ranges_as_quantize_dequantize_pairs(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

    qat, x = trained(small_model(), epochs=1)
    path = str(tmp_path / "qat.onnx")
    report = bnseq.export(qat, path, data=x)
    assert report.quantization.aware and report.quantization.kind == "int8 QDQ"
    assert report.quantization.mean_rel < 1e-2
    operators = {node.op_type for node in onnx.load(path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= operators


@needs_tensorflow
def test_export_refuses_a_model_that_has_not_trained_and_other_quantizations(tmp_path):
    qat = bnseq.quantize_aware(small_model())
    with pytest.raises(ValueError, match="is quantize-aware but has not trained: the ranges of image_quantizer"):
        bnseq.export(qat, str(tmp_path / "a.tflite"))
    trained_model, x = trained(small_model(), epochs=1)
    with pytest.raises(ValueError, match="exports as int8, from the ranges it learned.*Received: quantize='float16'"):
        bnseq.export(trained_model, str(tmp_path / "b.tflite"), quantize="float16", data=x)
    with pytest.raises(ValueError, match="recalibrate= sets the statistics of a float model"):
        bnseq.export(trained_model, str(tmp_path / "c.tflite"), data=x, recalibrate=True)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("how", ["trainable=False", "statistics", "affine"])
def test_a_frozen_batch_norm_stays_frozen(how):
    model = small_model()
    bn = model.get_layer("bn")
    if how == "trainable=False":
        bn.trainable = False
    else:
        bnseq.freeze(model, layers=["bn"], statistics=how == "statistics", affine=how == "affine")
    qat, report = bnseq.quantize_aware_with_report(model)
    if how == "affine":  # statistics that train but gamma and beta held: no unit holds that apart
        (decision,) = [each for each in report.decisions if each.layer == "bn"]
        assert decision.how == "ranged" and "gamma and beta are frozen while its statistics train" in str(decision)
        return
    unit = qat.get_layer("conv")
    before = [numpy(v) for v in unit.batch_norm.weights]  # gamma, beta, mean, variance
    x = np.random.default_rng(7).normal(size=(16, 6, 6, 3)).astype("float32")
    qat.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    qat.fit(x, np.zeros(16, "int32"), epochs=1, batch_size=8, verbose=0)
    after = [numpy(v) for v in unit.batch_norm.weights]
    assert np.array_equal(before[2], after[2]) and np.array_equal(before[3], after[3])  # statistics held
    moved = not np.array_equal(before[0], after[0])
    assert moved is (how == "statistics")  # gamma trains only where only the statistics were frozen


def test_a_mixed_precision_model_trains_for_int8_in_float32_and_exports(tmp_path):
    """mixed_float16 in the source: the quantize-aware model computes in float32, says so, trains, exports."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = small_model()  # built under the policy: every layer computes in float16
    finally:
        keras.config.set_dtype_policy("float32")
    keras.config.set_dtype_policy("mixed_float16")  # and the policy still set while quantize_aware builds
    try:
        policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
        before = [numpy(variable) for variable in model.variables]
        qat, report = bnseq.quantize_aware_with_report(model)
        sublayers = [each for layer in qat.layers for each in layer._flatten_layers() if not isinstance(
            each, keras.layers.InputLayer)]
        assert {each.dtype_policy.name for each in sublayers} == {"float32"}
        assert report.float32 == tuple(layer.name for layer in model.layers[1:])  # all but the input layer
        assert "add" in report.float32 and "pool" in report.float32  # layers without variables too
        assert "computes in float32; these computed in float16 or bfloat16: conv, bn, relu" in str(report)
        x = np.random.default_rng(4).normal(size=(32, 6, 6, 3)).astype("float32")
        y = np.random.default_rng(5).integers(0, 3, 32)
        qat.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        history = qat.fit(x, y, epochs=1, batch_size=8, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.all(np.isfinite(history.history["loss"]))
    assert {layer.name: layer.dtype_policy.name for layer in model.layers} == policies  # the source as it was
    assert all(np.array_equal(a, numpy(b)) for a, b in zip(before, model.variables))
    if TENSORFLOW and _has("ai_edge_litert"):
        report = bnseq.export(qat, str(tmp_path / "qat.tflite"), data=x)
        assert report.quantization.float_operators == () and report.quantization.agreement >= 0.9


class _Apply(layers.Layer):
    """No variables, and a Python function for an argument: Keras has no config for it."""

    def __init__(self, function, **kwargs):
        super().__init__(**kwargs)
        self.function = function

    def call(self, inputs):
        return self.function(inputs)


def test_a_half_precision_layer_without_a_config_is_shared_as_it_is_and_named():
    """No config to re-create it in float32 from (get_config raises NotImplementedError for a Python
    function argument): shared in float16, named in the report, and the model trains."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((5,), name="features")
        x = layers.BatchNormalization(name="bn")(layers.Dense(4, use_bias=False, name="dense")(inputs))
        x = _Apply(lambda t: t * 0.5, name="halve")(x)
        model = keras.Model(inputs, layers.Dense(2, name="logits", dtype="float32")(x))
        qat, report = bnseq.quantize_aware_with_report(model)
        assert report.half_precision == ("halve",) and report.float32 == ("dense", "bn")
        assert qat.get_layer("halve") is model.get_layer("halve")
        assert "left in half precision (no config to re-create them from): halve" in str(report)
        x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
        qat.compile(keras.optimizers.Adam(1e-2), "mse")
        history = qat.fit(x, np.zeros((16, 2), "float32"), epochs=1, batch_size=8, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.all(np.isfinite(history.history["loss"]))


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None
