"""bnseq.recalibrate: the moving statistics become each BatchNormalization input's exact mean and variance."""

import re

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import probes
from bnseq.statistics import plans


def scramble(model, seed):
    """Stale statistics, far from anything the data gives."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(5.0, 1.0, channels))
            layer.moving_variance.assign(rng.uniform(10.0, 20.0, channels))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0.0, 0.5, channels))
    return model


def expected_statistics(inputs_of_bn, x, bn):
    """NumPy's mean and biased variance of the BatchNormalization's input, inference upstream."""
    values = np.asarray(keras.ops.convert_to_numpy(inputs_of_bn(x, training=False)), np.float64)
    axes = tuple(axis for axis in range(values.ndim) if axis != bn.axis % values.ndim)
    return values.mean(axis=axes), values.var(axis=axes)


def assert_statistics(bn, mean, variance):
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), variance, rtol=1e-5, atol=1e-6)


def sequential_model():
    return bnseq.Sequential(
        [keras.Input((6, 6, 2)), layers.Conv2D(3, 3, activation="relu"), layers.Flatten(),
         layers.Dense(5, activation="tanh"), layers.Dense(4)],
        batch_norm=True,
    )


def check_sequential(model, x):
    for index, layer in enumerate(model.layers):
        if isinstance(layer, layers.BatchNormalization):
            prefix = keras.Sequential([keras.Input(model.input_shape[1:]), *model.layers[:index]])
            assert_statistics(layer, *expected_statistics(prefix, x, layer))


def test_sequential_arrays_with_a_ragged_last_batch():
    model = scramble(sequential_model(), 0)
    x = np.random.default_rng(1).normal(1.0, 2.0, size=(37, 6, 6, 2)).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    assert [row.batch_norm for row in report] == [
        layer.name for layer in model.layers if isinstance(layer, layers.BatchNormalization)
    ]
    assert [row.samples for row in report] == [37 * 4 * 4, 37, 37]
    check_sequential(model, x)


def test_tf_data_dataset_of_x_y_batches():
    tf = pytest.importorskip("tensorflow")
    model = scramble(sequential_model(), 2)
    x = np.random.default_rng(3).normal(size=(21, 6, 6, 2)).astype("float32")
    y = np.zeros((21, 4), "float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)  # 5, 5, 5, 5, 1
    bnseq.recalibrate(model, dataset, verbose=0)
    check_sequential(model, x)


def test_functional_with_branches_and_nothing_else_changes():
    inputs = keras.Input((4,))
    a = layers.BatchNormalization(name="a_bn")(layers.Dense(3, use_bias=False, name="a")(inputs))
    b = layers.BatchNormalization(name="b_bn")(layers.Dense(3, use_bias=False, name="b")(inputs))
    merged = layers.Add(name="add")([layers.ReLU()(a), b])
    out = layers.BatchNormalization(name="out_bn")(layers.Dense(2, use_bias=False, name="c")(merged))
    model = scramble(keras.Model(inputs, out), 4)
    untouched = {
        w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights if "moving" not in w.path
    }
    x = np.random.default_rng(5).normal(3.0, 1.0, size=(30, 4)).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=7, verbose=0)
    assert sorted(row.batch_norm for row in report) == ["a_bn", "b_bn", "out_bn"]
    for name in ("a_bn", "b_bn", "out_bn"):
        bn = model.get_layer(name)
        assert_statistics(bn, *expected_statistics(keras.Model(inputs, bn.input), x, bn))
    for w in model.weights:
        if "moving" not in w.path:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), untouched[w.path])


def test_nested_model():
    inner = bnseq.Sequential([keras.Input((3,)), layers.Dense(3, activation="relu")], batch_norm=True, name="inner")
    inputs = keras.Input((4,))
    first = layers.BatchNormalization(name="first")(layers.Dense(3, use_bias=False)(inputs))
    model = scramble(keras.Model(inputs, inner(first)), 6)
    x = np.random.default_rng(7).normal(-2.0, 0.5, size=(19, 4)).astype("float32")
    bnseq.recalibrate(model, x, batch_size=4, verbose=0)
    bn = model.get_layer("first")
    assert_statistics(bn, *expected_statistics(keras.Model(inputs, bn.input), x, bn))
    head = keras.Model(inputs, first)
    inner_bn = inner.layers[1]
    mean, variance = expected_statistics(
        lambda data, training: inner.layers[0](head(data, training=training)), x, inner_bn
    )
    assert_statistics(inner_bn, mean, variance)


def test_report_prints_as_a_table():
    model = scramble(bnseq.Sequential([keras.Input((2,)), layers.Dense(2, name="d")], batch_norm=True), 8)
    report = bnseq.recalibrate(model, np.ones((3, 2), "float32"), verbose=0)
    (row,) = report
    lines = str(report).splitlines()
    assert lines[0].split() == ["BatchNormalization", "samples", "max", "|Δ", "mean|", "max", "|Δ", "var|"]
    assert lines[1].split()[:2] == ["d_bn", "3"]
    assert row.mean_change > 1.0 and row.variance_change > 5.0


def test_errors():
    with pytest.raises(TypeError, match=re.escape("recalibrate expects a keras.Model. Received: model=")):
        bnseq.recalibrate(layers.Dense(2), np.ones((2, 2)))
    model = sequential_model()
    expected = "recalibrate needs data with at least one batch. Received: data=[]"
    with pytest.raises(ValueError, match=re.escape(expected)):
        bnseq.recalibrate(model, [])


# batch_normalize(model, data=...) keeps a trained model's predictions ---------


def trained_plain_model():
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), layers.Conv2D(4, 3, activation="relu"), layers.Flatten(),
         layers.Dense(8, activation="tanh"), layers.Dense(3)]
    )
    rng = np.random.default_rng(10)
    x = rng.normal(size=(64, 6, 6, 2)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, rng.normal(size=(64, 3)).astype("float32"), epochs=2, batch_size=16, verbose=0)
    return model, x


def relative_difference(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def test_batch_normalize_with_data_keeps_predictions_and_trains_on():
    model, x = trained_plain_model()
    before = keras.ops.convert_to_numpy(model(x, training=False))
    fixed = bnseq.batch_normalize(model, data=x, batch_size=16)
    assert [type(layer).__name__ for layer in fixed.layers] == [
        "Conv2D", "BatchNormalization", "Activation", "Flatten", "Dense", "BatchNormalization",
        "Activation", "Dense", "BatchNormalization",
    ]
    assert bnseq.lint(fixed) == []
    after = keras.ops.convert_to_numpy(fixed(x, training=False))
    assert relative_difference(before, after) <= 1e-4
    without = keras.ops.convert_to_numpy(bnseq.batch_normalize(model)(x, training=False))
    assert relative_difference(before, without) > 1e-2  # what data= is for
    # In training mode the batch statistics are the data's: the first step starts where the model was.
    train_mode = keras.ops.convert_to_numpy(fixed(x, training=True))
    assert relative_difference(before, train_mode) <= 1e-3
    fixed.compile(optimizer="adam", loss="mse")
    history = fixed.fit(x, np.zeros((64, 3), "float32"), epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_batch_normalize_with_data_functional_and_taken_over_weights_kept():
    inputs = keras.Input((5,))
    x = layers.Dense(4, name="a")(inputs)
    kept = layers.BatchNormalization(name="kept")(layers.Dense(4, use_bias=False, name="b")(inputs))
    model = keras.Model(inputs, layers.Dense(2, name="head")(layers.Concatenate()([x, kept])))
    scramble(model, 11)
    data = np.random.default_rng(12).normal(1.0, 2.0, size=(40, 5)).astype("float32")
    before = keras.ops.convert_to_numpy(model(data, training=False))
    fixed = bnseq.batch_normalize(model, data=data, batch_size=9)
    for name in ("kept",):
        for old, new in zip(model.get_layer(name).weights, fixed.get_layer(name).weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(old), keras.ops.convert_to_numpy(new))
    assert relative_difference(before, keras.ops.convert_to_numpy(fixed(data, training=False))) <= 1e-4


def test_batch_normalize_data_needs_a_built_model():
    unbuilt = keras.Sequential([layers.Dense(2)], name="later")
    with pytest.raises(ValueError) as error:
        bnseq.batch_normalize(unbuilt, data=np.ones((2, 3), "float32"))
    assert str(error.value) == (
        "batch_normalize(data=...) keeps the predictions of a trained model, but Sequential 'later' is "
        "not built. Build and train it first, or leave `data` out."
    )


def test_channels_first_runs_on_every_cpu():
    # Where TensorFlow lacks channels_first kernels (oneDNN off), the compiled segments run by XLA.
    model = scramble(
        bnseq.Sequential([keras.Input((2, 5, 5)), layers.Conv2D(3, 3, data_format="channels_first")], batch_norm=True),
        13,
    )
    x = np.random.default_rng(14).normal(size=(9, 2, 5, 5)).astype("float32")
    bnseq.recalibrate(model, x, batch_size=4, verbose=0)
    conv, bn = model.layers[0], model.layers[1]
    assert bn.axis == 1
    features = probes.infer(conv, x).astype(np.float64)
    assert_statistics(bn, features.mean(axis=(0, 2, 3)), features.var(axis=(0, 2, 3)))


class Batches(keras.utils.PyDataset):
    def __init__(self, x, size):
        super().__init__()
        self.x, self.size = x, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, index):
        chunk = self.x[index * self.size : (index + 1) * self.size]
        return chunk, np.zeros((len(chunk), 4), "float32")


def test_py_dataset_and_a_generator():
    x = np.random.default_rng(15).normal(size=(23, 6, 6, 2)).astype("float32")
    model = scramble(sequential_model(), 16)
    bnseq.recalibrate(model, Batches(x, 6), verbose=0)
    check_sequential(model, x)
    model = scramble(sequential_model(), 17)
    report = bnseq.recalibrate(model, (x[start : start + 5] for start in range(0, 23, 5)), verbose=0)
    assert report[1].samples == 23
    check_sequential(model, x)


def test_mixed_precision_statistics_in_float32_or_wider():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = scramble(bnseq.Sequential([keras.Input((4,)), layers.Dense(3, name="d")], batch_norm=True), 18)
        x = np.random.default_rng(19).normal(50.0, 10.0, size=(64, 4)).astype("float32")
        bnseq.recalibrate(model, x, batch_size=16, verbose=0)
        bn = model.layers[1]
        assert bn.moving_mean.dtype == "float32"
        features = keras.ops.convert_to_numpy(model.layers[0](x)).astype(np.float64)  # the float16 features
    finally:
        keras.config.set_dtype_policy("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), features.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), features.var(axis=0), rtol=1e-5)


def test_report_is_in_model_order_also_for_hidden_batch_norms():
    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.bn = layers.BatchNormalization(name="hidden")

        def call(self, x, training=None):
            return self.bn(x, training=training)

    inputs = keras.Input((3,))
    first = layers.BatchNormalization(name="first")(layers.Dense(3, use_bias=False)(inputs))
    model = keras.Model(inputs, Block(name="block")(first))
    report = bnseq.recalibrate(model, np.random.default_rng(20).normal(size=(8, 3)).astype("float32"), verbose=0)
    assert [row.batch_norm for row in report] == ["first", "hidden"]


# Segment by segment: the same statistics whatever is kept, and what it cost -----


def residual_model():
    """Two levels on the main path, a BatchNormalization on the shortcut, a skip from the input."""
    inputs = keras.Input((5, 5, 3))
    x = layers.BatchNormalization(name="bn1")(layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs))
    x = layers.ReLU()(x)
    x = layers.BatchNormalization(name="bn2")(layers.Conv2D(4, 3, padding="same", use_bias=False)(x))
    shortcut = layers.BatchNormalization(name="short")(layers.Conv2D(4, 1, use_bias=False)(inputs))
    x = layers.ReLU()(layers.Add()([x, shortcut]))
    x = layers.Concatenate()([x, inputs])
    x = layers.BatchNormalization(name="bn3")(layers.Conv2D(2, 1, use_bias=False)(x))
    return keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))


def check_functional(model, x, names):
    for name in names:
        bn = model.get_layer(name)
        assert_statistics(bn, *expected_statistics(keras.Model(model.input, bn.input), x, bn))


@pytest.mark.parametrize("cache_limit", ["auto", 0, 60_000])
def test_statistics_are_exact_whatever_the_cache_keeps(cache_limit):
    model = scramble(residual_model(), 21)
    x = np.random.default_rng(22).normal(0.5, 2.0, size=(45, 5, 5, 3)).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=8, verbose=0, cache_limit=cache_limit)
    check_functional(model, x, ["bn1", "bn2", "short", "bn3"])
    if cache_limit == "auto":
        assert report.passes == 1.0  # every call ran once
        assert report.cache_peak > 0
    elif cache_limit == 0:  # nothing kept: each level from the data again
        assert report.passes > 1.5
        assert report.cache_peak == x.nbytes
    else:
        assert 1.0 < report.passes < 2.0


def test_report_passes_and_memory_line():
    model = scramble(residual_model(), 23)
    x = np.random.default_rng(24).normal(size=(16, 5, 5, 3)).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    assert str(report).splitlines()[-1] == (
        f"1.00 forward passes of work; at most {report.cache_peak / 2**20:,.1f} MiB of activations kept"
    )
    assert report.cache_peak >= x.nbytes


def test_cache_limit_is_checked_before_anything_changes():
    model = scramble(residual_model(), 25)
    before = keras.ops.convert_to_numpy(model.get_layer("bn1").moving_mean).copy()
    for wrong in (-1, 1.5, "big", True):
        with pytest.raises(ValueError, match=re.escape(f"Received: cache_limit={wrong!r}")):
            bnseq.recalibrate(model, np.zeros((2, 5, 5, 3), "float32"), cache_limit=wrong)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("bn1").moving_mean), before)


def test_compiled_segments_are_reused_and_see_new_weights():
    model = scramble(residual_model(), 26)
    x = np.random.default_rng(27).normal(size=(20, 5, 5, 3)).astype("float32")
    bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    (plan,) = plans._PLANS[model].values()
    functions = dict(plan.functions)
    conv = model.layers[1]
    conv.kernel.assign(keras.ops.convert_to_numpy(conv.kernel) * 3.0)  # the next call must see this
    bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    (again,) = plans._PLANS[model].values()
    assert again is plan and plan.functions == functions  # nothing compiled again
    check_functional(model, x, ["bn1", "bn2", "short", "bn3"])


def test_a_changed_sequential_gets_a_new_plan():
    model = scramble(sequential_model(), 28)
    x = np.random.default_rng(29).normal(size=(12, 6, 6, 2)).astype("float32")
    bnseq.recalibrate(model, x, verbose=0)
    (plan,) = plans._PLANS[model].values()
    model.add(layers.Dense(2))
    scramble(model, 30)
    bnseq.recalibrate(model, x, verbose=0)
    (new_plan,) = plans._PLANS[model].values()
    assert new_plan is not plan
    check_sequential(model, x)


def test_shared_tower_pools_both_calls():
    tower = keras.Sequential(
        [keras.Input((3,)), layers.Dense(4, use_bias=False), layers.BatchNormalization(name="tower_bn")],
        name="tower",
    )
    left, right = keras.Input((3,), name="left"), keras.Input((3,), name="right")
    model = scramble(keras.Model([left, right], layers.Subtract()([tower(left), tower(right)])), 31)
    rng = np.random.default_rng(32)
    a = rng.normal(1.0, 1.0, size=(14, 3)).astype("float32")
    b = rng.normal(-3.0, 2.0, size=(14, 3)).astype("float32")
    report = bnseq.recalibrate(model, {"left": a, "right": b}, batch_size=5, verbose=0)
    assert [(row.batch_norm, row.samples) for row in report] == [("tower_bn", 28)]
    features = keras.ops.convert_to_numpy(tower.layers[0](np.concatenate([a, b]))).astype(np.float64)
    assert_statistics(tower.layers[1], features.mean(axis=0), features.var(axis=0))


def test_a_batch_norm_fed_by_itself_is_refused_and_nothing_changes():
    bn = layers.BatchNormalization(name="again")
    dense = layers.Dense(3, use_bias=False)
    inputs = keras.Input((3,))
    model = scramble(keras.Model(inputs, bn(dense(bn(inputs)))), 33)
    before = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    with pytest.raises(ValueError) as error:
        bnseq.recalibrate(model, np.ones((4, 3), "float32"), verbose=0)
    assert str(error.value) == (
        "BatchNormalization 'again' is called on a tensor computed from its own output, so its statistics "
        "would depend on themselves: no exact value exists. Give each call its own BatchNormalization layer."
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), before)


def test_a_failure_midway_leaves_every_statistic_as_it_was():
    model = scramble(residual_model(), 34)
    before = {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}
    good = np.zeros((4, 5, 5, 3), "float32")
    batches = [good, good, np.zeros((4, 6, 6, 3), "float32")]  # the last batch cannot go through
    with pytest.raises(Exception):  # noqa: B017 - whatever the backend raises for the shape
        bnseq.recalibrate(model, batches, verbose=0)
    for w in model.weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), before[w.path])


def test_hidden_batch_norms_measured_in_a_chain():
    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.first = layers.BatchNormalization(name="inner_first")
            self.dense = layers.Dense(3, use_bias=False)
            self.second = layers.BatchNormalization(name="inner_second")

        def call(self, x, training=None):
            return self.second(self.dense(keras.ops.relu(self.first(x, training=training))), training=training)

    inputs = keras.Input((3,))
    outer = layers.BatchNormalization(name="outer")(layers.Dense(3, use_bias=False)(inputs))
    block = Block(name="block")
    model = scramble(keras.Model(inputs, block(outer)), 35)
    x = np.random.default_rng(36).normal(2.0, 1.5, size=(22, 3)).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=6, verbose=0)
    assert [row.batch_norm for row in report] == ["outer", "inner_first", "inner_second"]
    head = keras.Model(inputs, outer)
    start = keras.ops.convert_to_numpy(head(x, training=False)).astype(np.float64)
    assert_statistics(block.first, start.mean(axis=0), start.var(axis=0))
    middle = block.dense(keras.ops.relu(block.first(head(x, training=False), training=False)))
    middle = keras.ops.convert_to_numpy(middle).astype(np.float64)
    assert_statistics(block.second, middle.mean(axis=0), middle.var(axis=0))


def test_an_unbuilt_model_is_built_by_the_first_batch():
    model = bnseq.Sequential([layers.Dense(3, name="d")], batch_norm=True)
    x = np.random.default_rng(37).normal(4.0, 1.0, size=(10, 2)).astype("float32")
    report = bnseq.recalibrate(model, x, verbose=0)
    assert model.built and report[0].samples == 10
    features = keras.ops.convert_to_numpy(model.layers[0](x)).astype(np.float64)
    assert_statistics(model.layers[1], features.mean(axis=0), features.var(axis=0))


def test_a_batch_that_does_not_match_the_inputs():
    left, right = keras.Input((3,), name="left"), keras.Input((3,), name="right")
    bn = layers.BatchNormalization()
    model = keras.Model([left, right], bn(layers.Add()([left, right])))
    with pytest.raises(ValueError, match=re.escape("Received: keys=['left']")):
        bnseq.recalibrate(model, {"left": np.ones((2, 3), "float32")}, verbose=0)
    with pytest.raises(ValueError, match=re.escape("takes 2 input(s), but a batch of the data holds 1")):
        bnseq.recalibrate(model, np.ones((2, 3), "float32"), verbose=0)


def test_masks_reach_the_layers_as_in_the_model():
    inputs = keras.Input((6,), dtype="int32")
    hidden = layers.LSTM(4)(layers.Embedding(10, 3, mask_zero=True)(inputs))
    bn = layers.BatchNormalization(name="bn")
    model = scramble(keras.Model(inputs, bn(layers.Dense(3, use_bias=False)(hidden))), 38)
    x = np.random.default_rng(39).integers(1, 10, size=(20, 6))
    x[:, 4:] = 0  # padding the LSTM must skip
    bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    assert_statistics(bn, *expected_statistics(keras.Model(inputs, bn.input), x, bn))


def test_statistics_are_those_predict_computes_where_eager_calls_differ():
    # A channels_first conv whose width equals its channels: Keras 3.15's TensorFlow eager add puts
    # the bias on the wrong axis (see probes.bias_add_is_sound); predict, compiled, is right.
    inputs = keras.Input((3, 6, 6))
    conv = layers.Conv2D(4, 3, data_format="channels_first", bias_initializer="random_normal")
    bn = layers.BatchNormalization(axis=1, name="bn")
    model = scramble(keras.Model(inputs, bn(conv(inputs))), 40)
    x = np.random.default_rng(41).normal(size=(16, 3, 6, 6)).astype("float32")
    bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    head = keras.Model(inputs, bn.input)
    head.compile(jit_compile=probes.needs_xla(head))  # XLA where TensorFlow lacks NCHW kernels
    features = head.predict(x, verbose=0).astype(np.float64)
    assert_statistics(bn, features.mean(axis=(0, 2, 3)), features.var(axis=(0, 2, 3)))
    if probes.channels_first_runs() and not probes.bias_add_is_sound():
        eager = keras.ops.convert_to_numpy(keras.Model(inputs, bn.input)(x)).astype(np.float64)
        assert np.max(np.abs(eager - features)) > 1e-3  # the bug this test is about is there


def test_a_subclassed_model_is_one_call_run_once_per_hidden_layer():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(3, use_bias=False)
            self.bn = layers.BatchNormalization(name="inner")

        def call(self, x, training=None):
            return self.bn(self.dense(x), training=training)

    net = Net()
    x = np.random.default_rng(42).normal(2.0, 1.0, size=(10, 4)).astype("float32")
    net(x)
    scramble(net, 43)
    report = bnseq.recalibrate(net, x, batch_size=4, verbose=0)
    assert [(row.batch_norm, row.samples) for row in report] == [("inner", 10)]
    assert report.passes == 1.0  # one call of the model, run once for its one hidden layer
    features = keras.ops.convert_to_numpy(net.dense(x)).astype(np.float64)
    assert_statistics(net.bn, features.mean(axis=0), features.var(axis=0))


# Masks, steps, bad arguments, non-finite data -----------------------------------


def masked_model(kind):
    embed = layers.Embedding(12, 4, mask_zero=True, name="embed")
    stack = [embed, layers.Dense(3, use_bias=False, name="d1"), layers.BatchNormalization(name="bn1"),
             layers.Dense(2, name="d2"), layers.BatchNormalization(name="bn2")]
    if kind == "sequential":
        return keras.Sequential([keras.Input((6,), dtype="int32"), *stack])
    inputs = keras.Input((6,), dtype="int32")
    x = inputs
    for layer in stack:
        x = layer(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_masked_positions_are_not_counted_as_keras_counts_them(kind):
    rng = np.random.default_rng(3)
    model = scramble(masked_model(kind), 4)
    x = rng.integers(1, 12, size=(37, 6))
    x[:, 4:] = 0  # padding, masked out
    x[::3, 2:] = 0
    bnseq.recalibrate(model, x, batch_size=10, verbose=0)
    keep = x != 0
    # An independent oracle: each BN's input in inference, the masked positions dropped.
    for name, before in (("bn1", "d1"), ("bn2", "d2")):
        upstream = keras.Model(model.inputs[0], model.get_layer(before).output)
        values = keras.ops.convert_to_numpy(upstream(x, training=False)).astype(np.float64)[keep]
        assert_statistics(model.get_layer(name), values.mean(0), values.var(0))
    # Keras's own batch statistics on one batch agree with the masked moments.
    bn = model.get_layer("bn1")
    upstream = keras.Model(model.inputs[0], model.get_layer("d1").output)
    inputs = upstream(x[:10], training=False)
    mean, variance = bn._moments(inputs, keras.ops.convert_to_tensor(x[:10] != 0))  # Keras private, the oracle
    one = scramble(masked_model(kind), 5)
    one.set_weights(model.get_weights())
    bnseq.recalibrate(one, x[:10], verbose=0)
    assert_statistics(one.get_layer("bn1"), keras.ops.convert_to_numpy(mean), keras.ops.convert_to_numpy(variance))


def test_steps_bounds_what_is_read():
    rng = np.random.default_rng(0)
    read = []

    def endless():
        while True:
            read.append(1)
            yield rng.normal(size=(8, 3)).astype("float32")

    model = bnseq.Sequential([keras.Input((3,)), layers.Dense(4)], batch_norm=True)
    report = bnseq.recalibrate(model, endless(), steps=3, verbose=0)
    assert report[0].samples == 24 and len(read) == 3

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            read.append(index)
            return np.full((5, 3), index, "float32")

    read.clear()
    assert bnseq.recalibrate(model, Batches(), steps=2, verbose=0)[0].samples == 10
    assert read == [0, 1]
    x = rng.normal(size=(50, 3)).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=8, steps=2, verbose=0)
    first = keras.ops.convert_to_numpy(model.layers[0](x[:16]))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.layers[1].moving_mean), first.mean(0), atol=1e-5)
    assert report[0].samples == 16


@pytest.mark.parametrize(
    "arguments", [{"batch_size": 0}, {"batch_size": -3}, {"batch_size": 2.0}, {"steps": 0}, {"steps": -1},
                  {"steps": True}, {"batch_size": "8"}]
)
def test_invalid_batch_size_or_steps_raise(arguments):
    model = bnseq.Sequential([keras.Input((3,)), layers.Dense(4)], batch_norm=True)
    name, value = next(iter(arguments.items()))
    message = f"`{name}` must be a positive int or None. Received: {name}={value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        bnseq.recalibrate(model, np.zeros((10, 3), "float32"), verbose=0, **arguments)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_raises_naming_the_layer_and_batch_and_changes_nothing(bad):
    rng = np.random.default_rng(1)
    model = scramble(
        bnseq.Sequential([keras.Input((3,)), layers.Dense(4), layers.Dense(2)], batch_norm=True), 2
    )
    before = [np.array(weight) for weight in model.get_weights()]
    x = rng.normal(size=(30, 3)).astype("float32")
    x[17, 1] = bad
    bns = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    with pytest.raises(ValueError, match=re.escape(f"BatchNormalization '{bns[0].name}' is not finite")
                       .replace("BatchNormalization", "The input of BatchNormalization") + ".* batch 2 "):
        bnseq.recalibrate(model, x, batch_size=8, verbose=0)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_non_finite_from_a_weight_names_the_layer_it_reaches():
    model = bnseq.Sequential([keras.Input((3,)), layers.Dense(4), layers.Dense(2)], batch_norm=True)
    second = model.layers[2]
    kernel = second.kernel.numpy()
    kernel[0, 0] = np.inf
    second.kernel.assign(kernel)
    message = f"The input of BatchNormalization '{model.layers[3].name}' is not finite.* batch 0 "
    with pytest.raises(ValueError, match=message):
        bnseq.recalibrate(model, np.ones((8, 3), "float32"), verbose=0)
