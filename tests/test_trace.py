"""Tracing subclassed layers and models (bnseq/trace.py) and everything that reads through it.

Oracles: the statistics each BatchNormalization meets are captured in one
inference pass (its `call` wrapped to record its input), independently of
bnseq's segments; folded models are compared with the original under
`predict`.
"""

import re

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import probes
from bnseq.reading import graph
from bnseq.reading import trace
from tests.backbones import BACKBONES
from tests.backbones import batch_norms
from tests.backbones import statistics_errors
from tests.test_fold import randomize_statistics

# Helpers ---------------------------------------------------------------------


def assert_exact_statistics(model, x, tolerance=1e-5):
    """Every called BatchNormalization's moving statistics are those of its input in inference."""
    for name, error in statistics_errors(model, x).items():
        assert error <= tolerance, name


def relative_error(model, other, x):
    expected = keras.tree.flatten(model.predict(x, verbose=0))
    actual = keras.tree.flatten(other.predict(x, verbose=0))
    return max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(expected, actual))


def statistics(layer):
    mean, variance = layer.moving_mean, layer.moving_variance
    return keras.ops.convert_to_numpy(mean).copy(), keras.ops.convert_to_numpy(variance).copy()


# Small blocks ----------------------------------------------------------------


class Reversed(layers.Layer):
    """Creates `bn_late` before `bn_early`, and calls them the other way round."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn_late = layers.BatchNormalization(name=f"{self.name}_late")
        self.dense = layers.Dense(3, use_bias=False, name=f"{self.name}_dense")
        self.bn_early = layers.BatchNormalization(name=f"{self.name}_early")

    def call(self, x):
        return self.bn_late(self.dense(keras.ops.relu(self.bn_early(x))))


def noise(y):
    """Zero times a tensor made outside the inputs' graph: a constant in a trace, which is refused."""
    return y + keras.ops.zeros_like(y) * keras.ops.ones((y.shape[-1],))


class ReversedOpaque(Reversed):
    """As `Reversed`, using a tensor made outside the graph (as eager randomness is): it does not trace."""

    def call(self, x):
        return noise(self.bn_late(self.dense(keras.ops.relu(self.bn_early(x)))))


class ValueBranch(Reversed):
    """Python control flow on a tensor value (it declares its output shape, so Keras can hold it)."""

    def call(self, x):
        y = self.bn_late(self.dense(keras.ops.relu(self.bn_early(x))))
        return y * 0.0 if keras.ops.max(y) > 1e9 else y

    def build(self, shape):
        self.bn_early.build(shape)
        self.dense.build(shape)
        self.bn_late.build((*shape[:-1], 3))

    def compute_output_shape(self, shape):
        return (*shape[:-1], 3)


class Unused(layers.Layer):
    """Builds a BatchNormalization it never calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(3, use_bias=False, name=f"{self.name}_dense")
        self.bn = layers.BatchNormalization(name=f"{self.name}_bn")
        self.spare = layers.BatchNormalization(name=f"{self.name}_spare")

    def build(self, shape):
        self.dense.build(shape)
        self.bn.build((*shape[:-1], 3))
        self.spare.build((*shape[:-1], 3))

    def call(self, x):
        return self.bn(self.dense(x))


class UnusedOpaque(Unused):
    def call(self, x):
        return noise(self.bn(self.dense(x)))


class Net(keras.Model):
    """A truly subclassed model: layers made in __init__, wired in call()."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")
        self.bn = layers.BatchNormalization(name="bn")
        self.dense = layers.Dense(5, activation="relu", name="dense")
        self.late = layers.BatchNormalization(name="late")
        self.head = layers.Dense(2, name="head")

    def call(self, x, training=None):
        x = keras.ops.relu(self.bn(self.conv(x), training=training))
        x = keras.ops.mean(x, axis=(1, 2))
        return self.head(self.late(self.dense(x), training=training))


def model_of(block, shape=(4,)):
    inputs = keras.Input(shape)
    return keras.Model(inputs, layers.Dense(3, name="out")(block(layers.Dense(shape[-1], name="in")(inputs))))


def data(shape=(4,), count=40, seed=0):
    return np.random.default_rng(seed).normal(1.5, 2.0, size=(count, *shape)).astype("float32")


# The tracer itself -----------------------------------------------------------


def test_traced_block_is_inlined_in_call_order():
    model = model_of(Reversed(name="r"))
    leaves = graph.walk(model).layers
    assert [layer.name for layer in leaves if isinstance(layer, layers.Layer)] == [
        "in", "r_early", "r_dense", "r_late", "out"
    ]
    assert [type(op).__name__ for op in leaves if not isinstance(op, layers.Layer)] == ["Relu"]
    assert [layer.name for layer in graph.flatten(model).batch_norms()] == ["r_early", "r_late"]


def test_tracing_leaves_the_layers_as_they_were():
    block = Reversed(name="r")
    model = model_of(block)

    def nodes():
        return [(len(each._inbound_nodes), len(each._outbound_nodes)) for each in block._flatten_layers()]

    before = nodes()
    bnseq.lint(model)  # the first reading traces (twice: training and inference) and checks the trace
    assert nodes() == before
    trace._TRACES.clear()
    bnseq.fold_report(model)
    assert nodes() == before


@pytest.mark.parametrize(
    "kind, reason",
    [
        (ValueBranch, "its call() cannot run on symbolic tensors"),
        (ReversedOpaque, "its call() passes a tensor computed outside the graph to 'multiply"),
    ],
)
def test_untraceable_block_says_why(kind, reason):
    model = model_of(kind(name="o"))
    (finding,) = [f for f in bnseq.lint(model) if f.code == "BN000"]
    assert finding.layer == "o" and "could not be traced: " + reason in finding.message
    decisions = {d.batch_norm: str(d) for d in bnseq.fold_report(model)}
    assert decisions["o_late"].startswith(f"o_late: kept, it is inside {kind.__name__} 'o', and it could not be "
                                          "traced: " + reason)


class Branching(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4, use_bias=False)
        self.bn = layers.BatchNormalization()

    def call(self, x, training=None):
        y = self.bn(self.dense(x), training=training)
        return y * 2.0 if training else y


class OwnWeight(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = layers.BatchNormalization()

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], 4), name="kernel")
        self.bn.build((*shape[:-1], 4))

    def call(self, x):
        return self.bn(keras.ops.matmul(x, self.kernel))


@pytest.mark.parametrize(
    "block, reason",
    [
        (Branching(name="b"), "its call() takes a different path under fit (training=True) than under predict"),
        (OwnWeight(name="w"), "its call() reads the weight 'w/kernel' directly in 'matmul"),
    ],
)
def test_traces_that_would_be_wrong_are_refused(block, reason):
    model = model_of(block)
    model(data()[:2])
    (finding,) = [f for f in bnseq.lint(model) if f.code == "BN000"]
    assert "could not be traced: " + reason in finding.message


class Pair(layers.Layer):
    """Two inputs (a list), a keyword tensor, two outputs, one layer called twice."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shared = layers.Dense(4, use_bias=False, name=f"{self.name}_shared")
        self.bn_a = layers.BatchNormalization(name=f"{self.name}_a")
        self.bn_b = layers.BatchNormalization(name=f"{self.name}_b")

    def call(self, inputs, scale=None, training=None):
        left, right = inputs
        a = self.bn_a(self.shared(left), training=training)
        b = self.bn_b(self.shared(right), training=training)
        return a * scale, keras.ops.relu(b)


def test_several_inputs_outputs_keywords_and_a_shared_layer():
    left, right, scale = keras.Input((3,), name="left"), keras.Input((3,), name="right"), keras.Input((4,), name="s")
    a, b = Pair(name="p")([left, right], scale=scale)
    model = keras.Model([left, right, scale], [a, b])
    randomize_statistics(model, np.random.default_rng(9))
    walked = graph.walk(model)
    assert walked.opaque == {}
    assert [layer.name for layer in walked.layers if isinstance(layer, layers.Layer)] == ["p_shared", "p_a", "p_b"]
    folded, report = bnseq.fold_with_report(model)
    assert [d.folded for d in report] == [False, False]  # the shared Dense feeds both: nothing folds
    rng = np.random.default_rng(10)
    x = [rng.normal(size=(6, 3)).astype("float32"), rng.normal(size=(6, 3)).astype("float32"),
         rng.normal(size=(6, 4)).astype("float32")]
    assert relative_error(model, folded, x) <= 1e-6
    recalibrated = bnseq.recalibrate(model, x, batch_size=4, verbose=0)
    assert [row.samples for row in recalibrated] == [6, 6]
    assert_exact_statistics(model, x)


def test_a_masked_input_is_not_traced():
    inputs = keras.Input((5,), dtype="int32")
    embedded = layers.Embedding(10, 4, mask_zero=True)(inputs)
    with pytest.warns(UserWarning, match="does not support masking"):  # Keras's own word on the block
        model = keras.Model(inputs, Reversed(name="m")(embedded))
    (finding,) = [f for f in bnseq.lint(model) if f.code == "BN000"]
    assert "could not be traced: its input carries a Keras mask" in finding.message


class Named(layers.Layer):
    """Gives its sublayers fixed names: two of them in one model clash once inlined."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4, use_bias=False, name="conv")
        self.bn = layers.BatchNormalization(name="norm")

    def call(self, x):
        return self.bn(self.dense(x))


def test_inlining_names_clashing_inner_layers_after_their_block():
    """0.5 refused ("give the layers unique names"); the second block's layers are now prefixed by its name."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, Named(name="second")(Named(name="first")(inputs)), name="twice")
    randomize_statistics(model)
    folded = bnseq.fold(model)
    assert [layer.name for layer in folded.layers[1:]] == ["conv", "second_conv"]
    x = np.random.default_rng(0).standard_normal((8, 4)).astype("float32")
    assert relative_error(model, folded, x) < 1e-5
    rebuilt = bnseq.batch_normalize(model, data=x)
    assert [layer.name for layer in rebuilt.layers[1:]] == ["conv", "norm", "second_conv", "second_norm"]
    assert relative_error(model, rebuilt, x) < 1e-4
    # the user's layers are never renamed: the second block's are copies under the new names
    assert [(block.dense.name, block.bn.name) for block in model.layers[1:]] == [("conv", "norm")] * 2


def test_data_that_does_not_match_a_traced_subclassed_model():
    model = Net(name="net")
    model(np.zeros((2, 6, 6, 3), "float32"))
    message = "Net 'net' was built on 1 input tensor(s), but a batch of the data holds 2."
    x = data((6, 6, 3), count=4)
    before = statistics(model.bn)
    with pytest.raises(ValueError, match=re.escape(message)):
        bnseq.recalibrate(model, [x, x], verbose=0)
    np.testing.assert_array_equal(statistics(model.bn)[0], before[0])


class ChannelsFirst(layers.Layer):
    """A channels_first convolution whose channel count equals its last spatial size, inside a block."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 1, use_bias=False, data_format="channels_first", name=f"{self.name}_conv")
        self.bn = layers.BatchNormalization(axis=1, name=f"{self.name}_bn")

    def call(self, x):
        return self.bn(self.conv(x))


def test_channels_first_inside_a_traced_block_reads_its_shape_from_the_trace():
    inputs = keras.Input((3, 5, 4))
    model = keras.Model(inputs, ChannelsFirst(name="cf")(inputs))
    randomize_statistics(model, np.random.default_rng(14))
    (decision,) = bnseq.fold_report(model)
    if probes.bias_add_is_sound():
        assert decision.folded, str(decision)
    else:  # the bias-add layout bug: folding would change eager outputs, so it stays
        assert "as many channels as its last spatial size" in decision.reason
    folded = bnseq.fold(model)
    x = data((3, 5, 4), count=2)
    expected, actual = probes.infer(model, x), probes.infer(folded, x)
    assert np.abs(expected - actual).max() <= 1e-5 * np.abs(expected).max()


# Recalibrate: call order, never called, fallback -------------------------------


@pytest.mark.parametrize("kind", [Reversed, ReversedOpaque])
def test_recalibrate_follows_call_order_not_creation_order(kind):
    block = kind(name="r")
    model = model_of(block)
    x = data()
    report = bnseq.recalibrate(model, x, batch_size=16, verbose=0)
    assert [row.batch_norm for row in report] == ["r_early", "r_late"]  # the order they run in
    assert all(row.samples == 40 for row in report)
    assert_exact_statistics(model, x)
    again = bnseq.recalibrate(model, x, batch_size=16, verbose=0)
    assert max(row.mean_change for row in again) <= 1e-5 and max(row.variance_change for row in again) <= 1e-5


@pytest.mark.parametrize("kind", [Unused, UnusedOpaque])
def test_a_batch_norm_never_called(kind):
    block = kind(name="u")
    model = model_of(block)
    randomize_statistics(model, np.random.default_rng(3))
    before = statistics(block.spare)
    report = bnseq.recalibrate(model, data(), batch_size=16, verbose=0)
    rows = {row.batch_norm: row for row in report}
    assert rows["u_spare"].samples == 0 and rows["u_bn"].samples == 40
    np.testing.assert_array_equal(statistics(block.spare)[0], before[0])
    np.testing.assert_array_equal(statistics(block.spare)[1], before[1])
    assert_exact_statistics(model, data())
    if kind is Unused:
        decisions = {d.batch_norm: str(d) for d in bnseq.fold_report(model)}
        assert decisions == {"u_bn": "u_bn: folded into u_dense", "u_spare": "u_spare: kept, it is never called"}


def test_recalibrate_of_a_traced_model_is_one_pass():
    model = model_of(Reversed(name="r"))
    report = bnseq.recalibrate(model, data(), batch_size=16, verbose=0)
    assert report.passes == 1.0


# A truly subclassed model ------------------------------------------------------


@pytest.fixture
def net():
    model = Net(name="net")
    model(np.zeros((2, 6, 6, 3), "float32"))
    randomize_statistics(model, np.random.default_rng(5))
    return model


def test_subclassed_model_is_linted(net):
    findings = [(f.code, f.layer, f.producer) for f in bnseq.lint(net)]
    assert findings == [("BN001", "late", "dense"), ("BN002", "late", "dense")]


def test_subclassed_model_folds_saves_and_loads(net, tmp_path):
    folded, report = bnseq.fold_with_report(net)
    assert [str(d) for d in report] == [
        "bn: folded into conv",
        "late: folded forward into head",
    ]
    assert not isinstance(folded, Net)
    assert [type(layer).__name__ for layer in folded.layers] == [
        "InputLayer", "Conv2D", "Dense", "Dense"
    ]  # the ops (relu, mean) are nodes, not layers
    x = data((6, 6, 3), count=8)
    assert relative_error(net, folded, x) <= 1e-5
    path = tmp_path / "net.keras"
    folded.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), folded.predict(x, verbose=0), rtol=0, atol=1e-6)


def test_subclassed_model_batch_normalize_and_recalibrate(net):
    x = data((6, 6, 3), count=24)
    fixed = bnseq.batch_normalize(net)
    assert bnseq.lint(fixed) == [] and not isinstance(fixed, Net)
    kinds = [type(layer).__name__ for layer in fixed.layers]
    assert kinds == ["InputLayer", "Conv2D", "BatchNormalization", "Dense", "BatchNormalization", "Activation", "Dense",
                     "BatchNormalization"]
    report = bnseq.recalibrate(net, x, batch_size=8, verbose=0)
    assert [row.batch_norm for row in report] == ["bn", "late"] and report.passes == 1.0
    assert_exact_statistics(net, x)


def test_subclassed_model_that_does_not_trace_is_refused_with_the_reason():
    class Opaque(keras.Model):
        def __init__(self):
            super().__init__(name="opaque")
            self.dense = layers.Dense(3, use_bias=False)
            self.bn = layers.BatchNormalization()

        def call(self, x):
            return noise(self.bn(self.dense(x)))

    model = Opaque()
    model(np.ones((2, 4), "float32"))
    message = "fold could not read Opaque 'opaque', a subclassed model: its call() passes a tensor computed outside"
    with pytest.raises(TypeError, match=re.escape(message)):
        bnseq.fold(model)


# keras-hub backbones whose BatchNormalization lives in blocks ------------------

@pytest.fixture(scope="module", params=sorted(BACKBONES))
def backbone(request):
    pytest.importorskip("keras_hub")
    model = BACKBONES[request.param]()
    randomize_statistics(model, np.random.default_rng(11))
    return request.param, model


def test_backbone_nothing_is_kept_for_lack_of_sight(backbone):
    name, model = backbone
    walked = graph.walk(model)
    assert walked.opaque == {}
    report = {d.batch_norm: d for d in bnseq.fold_report(model)}
    assert sorted(report) == sorted(layer.name for layer in batch_norms(model))
    assert not [f for f in bnseq.lint(model) if f.code == "BN000"]
    for layer in walked.layers:
        if not isinstance(layer, layers.BatchNormalization):
            continue
        producer = walked.sole_producer(layer)
        if (
            producer is not None
            and bnseq.kinds.is_linear(producer)
            and bnseq.kinds.is_identity(producer.activation)
            and walked.feeds_only(producer, layer)
        ):
            assert report[layer.name].folded, str(report[layer.name])


def test_backbone_fold_equals_the_original_under_predict(backbone):
    name, model = backbone
    folded = bnseq.fold(model)
    assert isinstance(folded, keras.Model) and not isinstance(folded, type(model))  # plain functional
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype("float32")
    assert relative_error(model, folded, x) <= 1e-4


def test_backbone_recalibrate_is_exact_and_settles(backbone):
    name, model = backbone
    x = np.random.default_rng(4).normal(0.5, 1.5, size=(12, 32, 32, 3)).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    assert report.passes <= 1.5
    assert_exact_statistics(model, x)
    again = bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    assert max(row.mean_change for row in again) <= 1e-4 and max(row.variance_change for row in again) <= 1e-4


def test_traced_backbone_folded_saves_and_loads(tmp_path):
    pytest.importorskip("keras_hub")
    model = BACKBONES["hgnetv2"]()
    randomize_statistics(model, np.random.default_rng(12))
    folded = bnseq.fold(model)
    path = tmp_path / "folded.keras"
    folded.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(13).normal(size=(2, 32, 32, 3)).astype("float32")
    for a, b in zip(keras.tree.flatten(loaded.predict(x, verbose=0)), keras.tree.flatten(folded.predict(x, verbose=0))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_block_after_a_nested_sequential_is_traced():
    # Found by tests/test_fuzz.py: the nested Sequential's output had no shape, so the block after it
    # was left untraced ("the shapes of its inputs are not known").
    from tests.test_fuzz import Block

    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(5, 3, padding="same", name="first")(inputs)
    nested = keras.Sequential(
        [keras.Input((6, 6, 5)), layers.Conv2D(5, 1, use_bias=False), layers.BatchNormalization(), layers.ReLU()],
        name="nested",
    )
    model = keras.Model(inputs, Block(5, "channels_last", name="blk")(nested(x)))
    assert bnseq.lint(model) == []
    assert all(decision.folded for decision in bnseq.fold_report(model))
