"""Models users have: keras-hub backbones, keras.applications files, Lambda and custom layers.

keras-hub backbones are functional subclasses (their get_config() returns
constructor arguments); each is built from its constructor with tiny sizes, no
presets or downloads.
"""

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import probes
from bnseq.probes import infer
from tests.backbones import batch_norms
from tests.test_fold import randomize_statistics

keras_hub = pytest.importorskip("keras_hub")
M = keras_hub.models


def resnet(block_type, use_pre_activation=False):
    return M.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type=block_type,
        use_pre_activation=use_pre_activation,
        image_shape=(32, 32, 3),
    )


def resnet_basic():
    return resnet("basic_block")


def resnet_bottleneck():
    return resnet("bottleneck_block")


def resnet_preactivation():
    return resnet("basic_block", use_pre_activation=True)


def densenet():
    return M.DenseNetBackbone(stackwise_num_repeats=[1, 1], growth_rate=4, image_shape=(32, 32, 3))


def vgg():
    return M.VGGBackbone(stackwise_num_repeats=[1, 1], stackwise_num_filters=[4, 8], image_shape=(16, 16, 3))


def cspnet():
    return M.CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1, 1],
        stackwise_strides=[1, 2],
        stackwise_num_filters=[8, 16],
        block_type="dark_block",
        stage_type="dark",
        image_shape=(32, 32, 3),
    )


def cspnet_bottleneck():
    # conv -> BN -> add -> LeakyReLU: folded, the pattern TensorFlow's oneDNN fuses wrongly under predict
    return M.CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1, 1],
        stackwise_strides=[1, 2],
        stackwise_num_filters=[8, 16],
        block_type="bottleneck_block",
        stage_type="dark",
        image_shape=(32, 32, 3),
    )


def efficientnet():
    # num_features stays at its default: keras-hub 0.32 reloads a saved
    # EfficientNetBackbone with a 1280-filter top_conv whatever was given.
    return M.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"],
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        input_shape=(32, 32, 3),
    )


def mobilenet():
    return M.MobileNetBackbone(
        stackwise_expansion=[[16], [24]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]],
        stackwise_kernel_size=[[3], [3]],
        stackwise_num_strides=[[2], [1]],
        stackwise_se_ratio=[[None], [0.25]],
        stackwise_activation=[["relu"], ["hard_swish"]],
        stackwise_padding=[[1], [1]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=1,
        depthwise_residual=False,
        last_layer_filter=32,
        input_num_filters=8,
        image_shape=(32, 32, 3),
    )


BACKBONES = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "resnet_preactivation": resnet_preactivation,
    "densenet": densenet,
    "vgg": vgg,
    "cspnet": cspnet,
    "cspnet_bottleneck": cspnet_bottleneck,
    "efficientnet": efficientnet,
    "mobilenet": mobilenet,
}




def relative_error(model, other, x):
    expected, actual = infer(model, x), infer(other, x)
    return float(np.max(np.abs(expected - actual)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def backbone(request):
    keras.utils.set_random_seed(0)
    model = BACKBONES[request.param]()
    return request.param, randomize_statistics(model, np.random.default_rng(1))


def test_backbone_is_read_fold_report_covers_every_batch_norm(backbone):
    name, model = backbone
    assert not isinstance(model, keras.Sequential) and type(model) is not keras.Model  # a subclass
    report = bnseq.fold_report(model)
    assert sorted(d.batch_norm for d in report) == sorted(layer.name for layer in batch_norms(model))
    findings = bnseq.lint(model)
    assert [f for f in findings if f.code == "BN000"] == []  # subclassed blocks (MobileNet's) are traced


def test_backbone_fold_equals_the_original(backbone):
    name, model = backbone
    folded, report = bnseq.fold_with_report(model)
    assert isinstance(folded, keras.Model) and not isinstance(folded, type(model))  # plain functional
    assert [tuple(t.shape) for t in folded.inputs] == [tuple(t.shape) for t in model.inputs]
    assert [tuple(t.shape) for t in folded.outputs] == [tuple(t.shape) for t in model.outputs]
    left = [layer for layer in batch_norms(folded)]
    assert len(left) == sum(not d.folded for d in report)
    x = np.random.default_rng(2).normal(size=(2, *model.inputs[0].shape[1:])).astype("float32")
    assert relative_error(model, folded, x) <= 1e-4
    expected, compiled = infer(model, x), probes.predicted(folded, x)  # as predict runs it, too
    assert float(np.max(np.abs(expected - compiled)) / np.max(np.abs(expected))) <= 1e-4


def test_backbone_batch_normalize_and_saved_file(backbone, tmp_path):
    name, model = backbone
    fixed = bnseq.batch_normalize(model)
    assert [f for f in bnseq.lint(fixed) if f.code != "BN000"] == []
    path = tmp_path / f"{name}.keras"
    model.save(path)
    assert bnseq.lint(path) == bnseq.lint(model)
    assert [str(d) for d in bnseq.fold_report(path)] == [str(d) for d in bnseq.fold_report(model)]


def test_backbone_recalibrate_is_exact_for_every_visible_batch_norm(backbone):
    name, model = backbone
    x = np.random.default_rng(3).normal(size=(10, *model.inputs[0].shape[1:])).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=4, verbose=0)
    assert sorted(row.batch_norm for row in report) == sorted(layer.name for layer in batch_norms(model))
    assert all(row.samples > 0 for row in report)
    visible = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    if not batch_norms(model):
        assert report.passes == 0.0 and report.cache_peak > 0  # VGG: nothing to compute
    else:  # subclassed blocks (MobileNet's) are traced: nothing is run twice
        assert report.passes == 1.0
    for bn in visible:
        values = infer(keras.Model(model.input, bn.input), x).astype(np.float64)
        axes = tuple(axis for axis in range(values.ndim) if axis != bn.axis % values.ndim)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), values.mean(axis=axes),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), values.var(axis=axes),
                                   rtol=1e-5, atol=1e-5)


def test_keras_applications_file(tmp_path):
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=4, classifier_activation=None
    )
    randomize_statistics(model, np.random.default_rng(3))
    path = tmp_path / "mobilenet_v2.keras"
    model.save(path)
    report = bnseq.fold_report(path)
    assert len(report) == len(batch_norms(model)) == 52 and all(d.folded for d in report)
    assert bnseq.lint(path) == []
    folded = bnseq.fold(path)
    x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-4


# Lambda and custom layers pass through unchanged ------------------------------


def double(x):
    return x * 2.0


@keras.saving.register_keras_serializable(package="bnseq_tests")
class Shift(layers.Layer):
    """A custom layer with a weight."""

    def build(self, input_shape):
        self.shift = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="shift")

    def call(self, x):
        return x + self.shift


@pytest.mark.parametrize("make", [lambda: layers.Lambda(lambda t: t * 2.0, name="pass"),
                                  lambda: layers.Lambda(double, name="pass"),
                                  lambda: Shift(name="pass")],
                         ids=["lambda", "named_function", "custom_layer"])
def test_lambda_and_custom_layers_pass_through(make):
    inputs = keras.Input((5,))
    x = layers.Dense(4, use_bias=False, name="d")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    special = make()
    x = special(x)
    model = keras.Model(inputs, layers.Dense(2, activation="relu", name="head")(x))
    randomize_statistics(model, np.random.default_rng(5))
    folded = bnseq.fold(model)
    assert folded.get_layer("pass") is special  # carried over, never re-created
    assert [type(layer).__name__ for layer in folded.layers] == ["InputLayer", "Dense", type(special).__name__, "Dense"]
    x_data = np.random.default_rng(6).normal(size=(3, 5)).astype("float32")
    assert relative_error(model, folded, x_data) <= 1e-5
    fixed = bnseq.batch_normalize(model)
    assert fixed.get_layer("pass") is special
    assert [type(layer).__name__ for layer in fixed.layers] == [
        "InputLayer", "Dense", "BatchNormalization", type(special).__name__, "Dense", "BatchNormalization", "Activation"
    ]
    assert fixed.get_layer("bn").momentum == model.get_layer("bn").momentum
    # The rewritten linear layers keep their kernels.
    np.testing.assert_array_equal(fixed.get_layer("d").get_weights()[0], model.get_layer("d").get_weights()[0])


def test_lambda_file_through_fold_with_safe_mode_false(tmp_path):
    inputs = keras.Input((5,))
    x = layers.BatchNormalization(name="bn")(layers.Dense(4, use_bias=False, name="d")(inputs))
    model = keras.Model(inputs, layers.Lambda(lambda t: t + 1.0, name="plus")(x))
    randomize_statistics(model, np.random.default_rng(7))
    path = tmp_path / "lambda.keras"
    model.save(path)
    folded = bnseq.fold(path, safe_mode=False)
    assert [type(layer).__name__ for layer in folded.layers] == ["InputLayer", "Dense", "Lambda"]
    x = np.random.default_rng(8).normal(size=(3, 5)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-5


# Never a silent pass ---------------------------------------------------------


class Block(layers.Layer):
    """A subclassed layer holding two BatchNormalization layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4, use_bias=True)
        self.first = layers.BatchNormalization(name="first")
        self.second = layers.BatchNormalization(name="second")

    def call(self, x, training=None):
        return self.second(self.first(self.dense(x), training=training), training=training)


def test_subclassed_layer_holding_batch_norm_is_read_through():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, Block(name="block")(inputs))
    findings = [(f.code, f.layer, f.producer) for f in bnseq.lint(model)]
    assert findings == [("BN001", "first", model.layers[1].dense.name), ("BN004", "second", "first")]
    assert [str(d) for d in bnseq.fold_report(model)] == [
        f"first: folded into {model.layers[1].dense.name}",
        f"second: folded into {model.layers[1].dense.name}, with first before it",
    ]
    randomize_statistics(model)
    folded = bnseq.fold(model)  # inside the traced block: both into the Dense
    assert not [layer for layer in folded._flatten_layers() if isinstance(layer, layers.BatchNormalization)]
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_backbone_batch_normalize_with_data_keeps_predictions(backbone):
    name, model = backbone
    rng = np.random.default_rng(3)
    original = [np.array(weight) for weight in model.get_weights()]
    x = rng.normal(size=(8, *model.inputs[0].shape[1:])).astype("float32")
    fixed = bnseq.batch_normalize(model, data=x, batch_size=4)
    assert relative_error(model, fixed, x) <= 1e-4
    assert all(np.array_equal(a, b) for a, b in zip(original, model.get_weights()))  # the original untouched


@pytest.mark.slow
def test_d_fine_s_hybrid_encoder_is_read_through_its_blocks():
    """0.5 kept 35 of D-FINE's BatchNormalization unseen: `DFineHybridEncoder.call()` does not trace."""
    from tests.backbones import d_fine

    model = d_fine()
    before = [np.array(keras.ops.convert_to_numpy(variable.value)) for variable in probes.state_of(model)]
    report = bnseq.fold_report(model)
    assert len(report) == len(batch_norms(model))
    inside = [decision for decision in report if decision.producer == "hybrid_encoder"]
    assert len(inside) > 20
    unseen = [decision for decision in inside if "read through" not in decision.reason]
    assert len(unseen) <= 2, [str(decision) for decision in unseen]
    assert all("fold cannot rebuild DFineHybridEncoder 'hybrid_encoder' around it" in d.reason for d in inside)
    assert [finding for finding in bnseq.lint(model) if finding.code == "BN000"] == []
    after = [keras.ops.convert_to_numpy(variable.value) for variable in probes.state_of(model)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_a_block_that_does_not_trace_is_linted_through_its_sublayers():
    class Encoder(layers.Layer):  # its call() reads a Python number off a symbolic shape
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.lateral = keras.Sequential([layers.Dense(4), layers.BatchNormalization(name="after_bias")])
            self.bn = layers.BatchNormalization(name="direct")

        def build(self, shape):
            self.lateral.build(shape)
            self.bn.build(shape[:-1] + (4,))

        def call(self, x):
            return self.bn(self.lateral(x)) * float(x.shape[0])

        def compute_output_shape(self, shape):
            return shape[:-1] + (4,)

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Encoder(name="encoder")(inputs))
    findings = bnseq.lint(model)
    assert [(finding.code, finding.layer) for finding in findings] == [("BN001", "after_bias"), ("BN000", "encoder")]
    assert "1 BatchNormalization layer ('direct')" in findings[1].message
    assert "Its sublayers 'sequential" in findings[1].message
