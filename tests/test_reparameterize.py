"""`bnseq.reparameterize`: summed conv + BatchNormalization branches merged into one convolution.

RepVGG's block (3x3 conv + BN, 1x1 conv + BN, a BN alone as the identity branch), MobileOne's
depthwise form, grouped convolutions, strided blocks with explicit padding, `a + b` inside a traced
subclassed layer and keras-hub's D-FINE block; each with random statistics and signed gamma,
measured as `predict` runs both models. And the branches that cannot merge, each kept with its reason.
"""

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import cli
from bnseq import probes
from tests.test_fold import randomize_statistics

CONVOLUTIONS = {1: layers.Conv1D, 2: layers.Conv2D, 3: layers.Conv3D}


def statistics(model, seed=0):
    return randomize_statistics(model, np.random.default_rng(seed), signed=True)


def predict_error(model, other, seed=1):
    x = probes.random_inputs(model, batch_size=3, seed=seed)
    x = x[0] if len(x) == 1 else x
    expected = probes.predicted(model, x)
    actual = probes.predicted(other, x)
    return float(np.max(np.abs(expected - actual)) / np.max(np.abs(expected)))


def counts(model):
    found = {}
    for layer in model._flatten_layers(include_self=False):
        found[type(layer).__name__] = found.get(type(layer).__name__, 0) + 1
    return found


def repvgg(rank=2, data_format="channels_last", channels=4, size=7, strides=1, identity=True, depthwise=False,
           groups=1):
    """One RepVGG (or, depthwise, MobileOne) block: k x k + BN, 1 x 1 + BN, and a BN alone, summed, then ReLU."""
    shape = (channels, *(size,) * rank) if data_format == "channels_first" else ((size,) * rank + (channels,))
    axis = 1 if data_format == "channels_first" else -1
    inputs = keras.Input(shape)

    def conv(kernel, name):
        if depthwise:
            kind = layers.DepthwiseConv1D if rank == 1 else layers.DepthwiseConv2D
            return kind(kernel, strides=strides, padding="same", use_bias=False, data_format=data_format, name=name)
        return CONVOLUTIONS[rank](channels, kernel, strides=strides, padding="same", use_bias=False, groups=groups,
                                  data_format=data_format, name=name)

    terms = [
        layers.BatchNormalization(axis=axis, name="bn3")(conv(3, "conv3")(inputs)),
        layers.BatchNormalization(axis=axis, name="bn1")(conv(1, "conv1")(inputs)),
    ]
    if identity:
        terms.append(layers.BatchNormalization(axis=axis, name="bn_identity")(inputs))
    x = layers.Add(name="sum")(terms)
    return statistics(keras.Model(inputs, layers.ReLU(name="relu")(x)))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_a_repvgg_block_becomes_one_convolution(rank, data_format):
    model = repvgg(rank, data_format)
    before = [np.array(w) for w in model.get_weights()]
    merged, report = bnseq.reparameterize_with_report(model)
    assert [str(decision) for decision in report] == [
        "sum: 3 branches (conv3 + bn3, conv1 + bn1, bn_identity) merged into conv3"
    ]
    assert counts(merged) == {"InputLayer": 1, CONVOLUTIONS[rank].__name__: 1, "ReLU": 1}
    conv = merged.get_layer("conv3")
    assert conv.use_bias and conv.padding == "same" and tuple(conv.kernel_size) == (3,) * rank
    assert predict_error(model, merged) < 1e-5
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the source untouched
    assert model.get_layer("conv3") is not conv


@pytest.mark.parametrize("depthwise, groups", [(True, 1), (False, 2), (False, 4)])
def test_mobileone_depthwise_and_grouped_branches_merge(depthwise, groups):
    model = repvgg(depthwise=depthwise, groups=groups)
    merged, report = bnseq.reparameterize_with_report(model)
    assert report[0].merged, str(report[0])
    kind = "DepthwiseConv2D" if depthwise else "Conv2D"
    assert counts(merged) == {"InputLayer": 1, kind: 1, "ReLU": 1}
    assert predict_error(model, merged) < 1e-5


def test_strided_same_padding_merges_where_the_windows_share_a_centre():
    """'same' with stride 2 pads by the input size: odd sizes centre 3x3 and 1x1 alike, even ones do not."""
    odd = repvgg(size=7, strides=2, identity=False)
    merged, report = bnseq.reparameterize_with_report(odd)
    assert report[0].merged and predict_error(odd, merged) < 1e-5
    even = repvgg(size=8, strides=2, identity=False)
    (decision,) = bnseq.reparameterize_report(even)
    assert not decision.merged
    assert "not centred on the same input position" in decision.reason


def test_explicit_padding_with_a_stride_merges_into_a_padded_convolution():
    """PyTorch's RepVGG pads its 3x3 branch by 1 and its 1x1 by 0; with a stride the result keeps that padding."""
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(6, 3, strides=2, use_bias=False, name="conv3")(layers.ZeroPadding2D(1, name="pad")(inputs))
    b = layers.Conv2D(6, 1, strides=2, name="conv1")(inputs)  # with a bias of its own, no BatchNormalization
    model = statistics(keras.Model(inputs, layers.BatchNormalization(name="bn3")(a) + b))
    merged, report = bnseq.reparameterize_with_report(model)
    assert report[0].merged and report[0].branches == ("pad + conv3 + bn3", "conv1")
    assert [type(layer).__name__ for layer in merged.layers[1:]] == ["ZeroPadding2D", "Conv2D"]
    assert merged.layers[-1].padding == "valid" and predict_error(model, merged) < 1e-5


def test_sums_written_as_plus_inside_a_traced_block_merge():
    @keras.saving.register_keras_serializable("test_reparameterize")
    class RepBlock(layers.Layer):
        def __init__(self, filters, **kwargs):
            super().__init__(**kwargs)
            self.big = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{self.name}_big")
            self.big_bn = layers.BatchNormalization(name=f"{self.name}_big_bn")
            self.small = layers.Conv2D(filters, 1, use_bias=False, name=f"{self.name}_small")
            self.small_bn = layers.BatchNormalization(name=f"{self.name}_small_bn")
            self.identity_bn = layers.BatchNormalization(name=f"{self.name}_identity_bn")

        def call(self, x, training=None):
            y = self.big_bn(self.big(x), training=training) + self.small_bn(self.small(x), training=training)
            return keras.ops.relu(y + self.identity_bn(x, training=training))

    model = keras.Sequential([keras.Input((6, 6, 4)), RepBlock(4, name="a"), RepBlock(4, name="b")])
    statistics(model)
    merged, report = bnseq.reparameterize_with_report(model)
    assert [decision.merged for decision in report] == [True, True]
    assert report[0].branches == ("a_big + a_big_bn", "a_small + a_small_bn", "a_identity_bn")
    assert counts(merged).get("BatchNormalization", 0) == 0 and counts(merged)["Conv2D"] == 2
    assert predict_error(model, merged) < 1e-5


def test_the_d_fine_repvgg_block_of_keras_hub_merges():
    pytest.importorskip("keras_hub")
    from keras_hub.src.models.d_fine.d_fine_layers import DFineCSPRepLayer

    block = DFineCSPRepLayer(
        activation_function="silu", batch_norm_eps=1e-5, filters=8, num_blocks=2, channel_axis=-1, name="csp"
    )
    inputs = keras.Input((8, 8, 8))
    model = statistics(keras.Model(inputs, block(inputs)))
    merged, report = bnseq.reparameterize_with_report(model)
    assert len(report) == 2 and all(decision.merged for decision in report)
    assert all(len(decision.branches) == 2 for decision in report)
    convs_before = sum(isinstance(layer, layers.Conv2D) for layer in model._flatten_layers())
    convs_after = sum(isinstance(layer, layers.Conv2D) for layer in merged._flatten_layers())
    assert (convs_before, convs_after) == (6, 4)
    assert predict_error(model, merged) < 1e-5
    folded = bnseq.fold(merged)
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in folded._flatten_layers())
    assert predict_error(model, folded) < 1e-5


def test_the_result_saves_and_loads_and_fold_folds_what_is_left(tmp_path):
    inputs = keras.Input((7, 7, 4))
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    a = layers.BatchNormalization(name="bn3")(layers.Conv2D(4, 3, padding="same", use_bias=False, name="c3")(x))
    b = layers.BatchNormalization(name="bn1")(layers.Conv2D(4, 1, use_bias=False, name="c1")(x))
    model = statistics(keras.Model(inputs, layers.Add(name="sum")([a, b, x])))
    merged = bnseq.reparameterize(model)
    path = tmp_path / "merged.keras"
    merged.save(path)
    loaded = keras.saving.load_model(path)
    assert predict_error(merged, loaded) == 0.0
    folded, report = bnseq.fold_with_report(merged)
    assert [str(decision) for decision in report] == ["stem_bn: folded into stem"]
    assert counts(folded) == {"InputLayer": 1, "Conv2D": 2}
    assert predict_error(model, folded) < 1e-5


def _two_branches(first, second, shape=(7, 7, 4)):
    inputs = keras.Input(shape)
    a = layers.BatchNormalization(name="bn_a")(first(inputs))
    b = layers.BatchNormalization(name="bn_b")(second(inputs))
    return statistics(keras.Model(inputs, layers.Add(name="sum")([a, b])))


@pytest.mark.parametrize("build, reason", [
    (lambda: _two_branches(layers.Conv2D(4, 3, groups=2, padding="same", name="a"),
                           layers.Conv2D(4, 1, padding="same", name="b")),
     "differ in groups"),
    (lambda: _two_branches(layers.Conv2D(4, 3, dilation_rate=2, padding="same", name="a"),
                           layers.Conv2D(4, 1, padding="same", name="b")),
     "is dilated"),
    (lambda: _two_branches(layers.Conv2D(4, 3, padding="same", activation="relu", name="a"),
                           layers.Conv2D(4, 1, name="b")),
     "applies its activation inside the branch"),
    (lambda: _two_branches(layers.Conv2D(4, 2, padding="same", name="a"), layers.Conv2D(4, 1, name="b")),
     "even kernel size"),
    (lambda: _two_branches(layers.Conv2D(4, 3, padding="same", name="a"),
                           layers.DepthwiseConv2D(3, padding="same", name="b")),
     "different kinds of convolution"),
    (lambda: _two_branches(layers.Conv2D(4, 3, padding="valid", name="a"),
                           layers.Conv2D(4, 1, padding="valid", name="b"), shape=(7, 7, 4)),
     None),  # shapes differ: the model cannot even be built; see below
])
def test_branches_that_cannot_merge_are_kept_with_the_reason(build, reason):
    if reason is None:
        with pytest.raises(ValueError):
            build()
        return
    model = build()
    merged, report = bnseq.reparameterize_with_report(model)
    (decision,) = report
    assert not decision.merged and reason in decision.reason, str(decision)
    assert str(decision).startswith("sum: kept (a + bn_a, b + bn_b), ")
    assert counts(merged) == counts(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        bnseq.reparameterize(model, strict=True)


def test_a_term_from_another_tensor_keeps_the_sum_and_a_residual_add_is_not_listed():
    inputs = keras.Input((6, 6, 4))
    other = layers.Conv2D(4, 1, name="other")(inputs)
    a = layers.BatchNormalization(name="bn_a")(layers.Conv2D(4, 3, padding="same", name="a")(inputs))
    b = layers.BatchNormalization(name="bn_b")(layers.Conv2D(4, 1, name="b")(inputs))
    model = statistics(keras.Model(inputs, layers.Add(name="sum")([a, b, layers.ReLU(name="r")(other)])))
    (decision,) = bnseq.reparameterize_report(model)
    assert not decision.merged and "not all computed from one tensor" in decision.reason
    residual = keras.Model(inputs, layers.Add(name="residual")([inputs, layers.ReLU()(a)]))
    assert bnseq.reparameterize_report(residual) == []


def test_terms_that_each_read_their_own_tensor_are_no_candidate():
    inputs = keras.Input((7, 7, 4))
    a = layers.BatchNormalization(name="bn_a")(layers.Conv2D(4, 3, strides=2, padding="same", name="a")(inputs))
    pooled = layers.AveragePooling2D(2, padding="same", name="pool")(inputs)
    model = statistics(keras.Model(inputs, layers.Add(name="sum")([a, pooled])))
    assert bnseq.reparameterize_report(model) == []


def test_a_branch_whose_convolution_feeds_another_layer_is_not_a_branch():
    inputs = keras.Input((6, 6, 4))
    conv = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    a = layers.BatchNormalization(name="bn_a")(conv)
    b = layers.BatchNormalization(name="bn_b")(layers.Conv2D(4, 1, name="b")(inputs))
    model = statistics(keras.Model(inputs, [layers.Add(name="sum")([a, b]), conv]))
    # bn_a alone reads the convolution's output, b reads the input: one branch per tensor, no candidate
    assert bnseq.reparameterize_report(model) == []
    assert counts(bnseq.reparameterize(model)) == counts(model)


class Branches(layers.Layer):
    """A 3x3 + BN and a 1x1 branch, summed with `+`: traces."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.big = layers.Conv2D(4, 3, padding="same", use_bias=False, name="big")
        self.bn = layers.BatchNormalization(name="big_bn")
        self.small = layers.Conv2D(4, 1, name="small")

    def call(self, x):
        return self.bn(self.big(x)) + self.small(x)


class Opaque(layers.Layer):
    """Holds `Branches`, and reads a Python number off a symbolic shape: does not trace."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = Branches(name="inner")

    def call(self, x):
        scale = float(x.shape[1] * x.shape[2]) ** 0
        return self.inner(x) * scale

    def compute_output_shape(self, input_shape):
        return input_shape


def test_a_sum_inside_a_block_that_does_not_trace_is_kept_saying_what_would_merge():
    inputs = keras.Input((None, None, 4))
    model = keras.Model(inputs, Opaque(name="opaque")(inputs))
    model(np.zeros((1, 5, 5, 4), "float32"))
    (decision,) = bnseq.reparameterize_report(model)
    assert not decision.merged and decision.branches == ("big + big_bn", "small")
    assert "read through Branches 'inner', it would merge into big" in decision.reason
    assert "reparameterize cannot rebuild Opaque 'opaque' around it" in decision.reason


def test_refusals():
    with pytest.raises(TypeError, match="expects a keras.Model"):
        bnseq.reparameterize(42)
    with pytest.raises(TypeError, match="strict"):
        bnseq.reparameterize(repvgg(), strict="yes")
    unbuilt = keras.Sequential([layers.Conv2D(4, 3)])
    with pytest.raises(ValueError, match="not built"):
        bnseq.reparameterize(unbuilt)


def test_the_command_line_merges_then_folds(tmp_path, capsys):
    model = repvgg()
    source, target = tmp_path / "in.keras", tmp_path / "out.keras"
    model.save(source)
    assert cli.main(["fold", "--reparameterize", str(source), str(target)]) == 0
    out = capsys.readouterr().out
    assert "Merged 1 of 1 sums of branches into one convolution each." in out
    loaded = keras.saving.load_model(target)
    assert counts(loaded) == {"InputLayer": 1, "Conv2D": 1, "ReLU": 1}
    assert predict_error(model, loaded) < 1e-5
