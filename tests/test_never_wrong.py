"""Reading a model exactly as Keras runs it, and changing nothing by reading it.

Each test is one case a hostile new user reproduced (the numbers in the
docstrings are what bnseq 0.5 did). Oracles: `predict` of the model itself,
and every variable of the source compared bit for bit before and after.
"""

import contextlib
import functools
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import bnseq
from bnseq import probes
from tests.test_fold import randomize_statistics


def variables_of(model):
    """Every variable a call could change, as NumPy copies, by path (RNN states included)."""
    return {variable.path + f"#{index}": np.array(keras.ops.convert_to_numpy(variable.value), copy=True)
            for index, variable in enumerate(probes.state_of(model))}


def assert_unchanged(model, before):
    after = variables_of(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert np.array_equal(after[key], value), key


def relative_error(model, other, x):
    expected = keras.tree.flatten(model.predict(x, verbose=0))
    actual = keras.tree.flatten(other.predict(x, verbose=0))
    return max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(expected, actual))


# 1. The branch Keras runs, not the signature's default -----------------------------


class ModeBranches(layers.Layer):
    """One BatchNormalization when training, another in inference, with `training=True` as the default."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(units, use_bias=False)
        self.bn_train = layers.BatchNormalization()
        self.bn_infer = layers.BatchNormalization()

    def build(self, input_shape):
        self.dense.build(input_shape)
        for bn in (self.bn_train, self.bn_infer):
            bn.build((*input_shape[:-1], self.dense.units))

    def call(self, x, training=True):
        y = self.dense(x)
        return self.bn_train(y) if training else self.bn_infer(y)


class DefaultTrue(layers.Layer):
    """The same path in both modes, but a signature default of `training=True`."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(units, use_bias=False)
        self.bn = layers.BatchNormalization()

    def call(self, x, training=True):
        return keras.ops.relu(self.bn(self.dense(x), training=training))


class FixedNames(layers.Layer):
    """A traced block with the same inner names in every instance, as people write them."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(units, use_bias=False, name="dense")
        self.bn = layers.BatchNormalization(name="norm")

    def call(self, x):
        return self.bn(self.dense(x))


def _model_of(block, shape=(3,)):
    inputs = keras.Input(shape)
    model = keras.Model(inputs, layers.Dense(2)(block(inputs)))
    x = np.zeros((2, *shape), "float32")
    model(x, training=True), model(x, training=False)  # both branches built
    randomize_statistics(model)
    return model


def test_a_block_that_branches_on_training_is_not_folded_on_its_default():
    """0.5 traced the `training=True` default, lint cached it, and fold folded the training branch: 0.80 off."""
    model = _model_of(ModeBranches())
    x = np.random.default_rng(0).standard_normal((16, 3)).astype("float32")
    bnseq.lint(model)  # the cache of 0.5 kept this trace
    report = bnseq.fold_report(model)
    assert [decision.folded for decision in report] == [False, False]
    assert all("different path under fit" in decision.reason for decision in report)
    folded = bnseq.fold(model)
    assert relative_error(model, folded, x) < 1e-5


def test_traced_in_the_mode_keras_runs_not_the_signature_default():
    """A block with a `training=True` default traces, and folds exactly under predict (its BN in inference)."""
    model = _model_of(DefaultTrue())
    x = np.random.default_rng(1).standard_normal((16, 3)).astype("float32")
    report = bnseq.fold_report(model)
    assert [decision.folded for decision in report] == [True]
    folded = bnseq.fold(model)
    assert relative_error(model, folded, x) < 1e-5
    # The inlined calls carry no `training` of the trace's own: a rebuilt model runs in its caller's mode.
    rebuilt = bnseq.batch_normalize(model, data=x)
    assert relative_error(model, rebuilt, x) < 1e-4
    for layer in rebuilt.layers:
        for node in layer._inbound_nodes:
            assert "training" not in node.arguments.kwargs, layer.name


class HardcodedInference(layers.Layer):
    """Keeps its BatchNormalization in inference whatever the mode: a graph could not."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4, use_bias=False)
        self.bn = layers.BatchNormalization()

    def call(self, x):
        return self.bn(self.dense(x), training=False)


def test_a_layer_called_with_a_fixed_training_is_not_inlined():
    model = _model_of(HardcodedInference())
    (decision,) = bnseq.fold_report(model)
    assert not decision.folded
    assert "with training=False whatever the mode" in decision.reason


class ScaledWhenTraining(layers.Layer):
    """The same layers in both modes, a different constant: only the constants tell the paths apart."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4, use_bias=False)
        self.bn = layers.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.multiply(self.bn(self.dense(x)), 2.0 if training else 1.0)


def test_paths_that_differ_only_in_a_constant_are_told_apart():
    (decision,) = bnseq.fold_report(_model_of(ScaledWhenTraining()))
    assert not decision.folded and "different path under fit" in decision.reason


# 2. Reading changes nothing ---------------------------------------------------------


class Counting(layers.Layer):
    """Counts its calls in a variable, and lets the count change what it computes."""

    def __init__(self, units=4, affects=True, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(units, use_bias=False)
        self.bn = layers.BatchNormalization()
        self.affects = affects  # whether the count changes the output (not where an oracle runs the model twice)

    def build(self, input_shape):
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls")
        super().build(input_shape)

    def call(self, x):
        self.calls.assign_add(1.0)
        y = self.bn(self.dense(x))
        return y * (1.0 + 0.01 * self.calls) if self.affects else y


def test_reading_a_block_with_a_step_counter_changes_nothing():
    """0.5's lint ran the block eagerly and bumped the user's counter: predictions 9% off afterwards."""
    model = _model_of(Counting())
    before = variables_of(model)
    findings = bnseq.lint(model)
    assert [finding.code for finding in findings] == ["BN000"]
    assert "changes the variable" in findings[0].message
    bnseq.fold_report(model)
    folded = bnseq.fold(model)  # keeps the block as it is: nothing to fold that bnseq can see
    assert_unchanged(model, before)
    assert not any(decision.folded for decision in bnseq.fold_report(model))
    assert folded is not None


def test_trace_checks_in_training_leave_statistics_and_seeds_alone():
    """Tracing checks the block under training=True too; its moving statistics and dropout seed stay."""

    class WithDropout(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = layers.Dense(4, use_bias=False)
            self.bn = layers.BatchNormalization()
            self.dropout = layers.Dropout(0.5)

        def call(self, x, training=None):
            return self.dropout(self.bn(self.dense(x)), training=training)

    model = _model_of(WithDropout())
    before = variables_of(model)
    (decision,) = bnseq.fold_report(model)
    assert decision.folded, decision
    assert_unchanged(model, before)


# 3. NaN is never a zero difference ------------------------------------------------


def test_largest_difference_counts_nan_and_infinity():
    assert probes.largest_difference([np.zeros(3)], [np.array([0.0, np.nan, 0.0])])[0] == np.inf
    assert probes.largest_difference([np.array([np.inf])], [np.array([np.inf])])[0] == np.inf
    assert probes.largest_difference([np.ones(2)], [np.ones(2)]) == (0.0, 0.0)


def test_export_refuses_a_sample_with_nan_naming_the_input(tmp_path):
    """0.5 computed max(0.0, nan) == 0.0: one NaN in the sample made any artifact pass."""
    model = bnseq.Sequential([keras.Input((4,), name="features"), layers.Dense(3)], batch_norm=True)
    sample = np.random.default_rng(3).standard_normal((6, 4)).astype("float32")
    sample[4, 1] = np.nan
    path = tmp_path / "m.keras"
    message = r"'features' holds NaN or infinity \(in 1 of 6 examples, the first at index 4"
    with pytest.raises(ValueError, match=message):
        bnseq.export(model, path, sample=sample)
    assert not path.exists()


def test_export_check_fails_when_the_model_itself_gives_nan(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.ops.log(inputs))  # log of a negative input: NaN
    sample = np.array([[1.0, 2.0], [-1.0, 3.0]], "float32")
    with pytest.raises(bnseq.ToleranceError) as caught:
        bnseq.export(model, tmp_path / "m.keras", sample=sample)
    assert caught.value.report.max_abs == np.inf


# 4. recalibrate leaves recurrent state where it was ------------------------------------


@pytest.mark.parametrize("kind", [layers.LSTM, layers.GRU])
def test_recalibrate_puts_stateful_recurrent_states_back(kind):
    """0.5 ran the data through a stateful LSTM/GRU and left its carried states overwritten."""
    rng = np.random.default_rng(4)
    model = keras.Sequential([
        keras.Input(batch_shape=(4, 5, 3)),
        kind(6, stateful=True, return_sequences=True),
        layers.Dense(4, use_bias=False),
        layers.BatchNormalization(),
    ])
    model(rng.standard_normal((4, 5, 3)).astype("float32"))  # an eager call sets the states (JAX's predict does not)
    (states_layer,) = [layer for layer in model.layers if isinstance(layer, kind)]
    states = [np.array(keras.ops.convert_to_numpy(each)) for each in states_layer.states]
    assert any(np.any(each) for each in states)
    x = rng.standard_normal((16, 5, 3)).astype("float32")
    report = bnseq.recalibrate(model, x, batch_size=4)
    assert report[0].samples == 16 * 5
    for before, after in zip(states, states_layer.states):
        assert np.array_equal(before, keras.ops.convert_to_numpy(after))
    bn = model.layers[-1]
    assert not np.allclose(keras.ops.convert_to_numpy(bn.moving_mean), 0.0)  # the statistics were set


# 5. Activations written as operations ------------------------------------------------

OPERATION_ACTIVATIONS = {
    "keras.activations.relu": keras.activations.relu,
    "keras.ops.silu": keras.ops.silu,
    "keras.activations.gelu": keras.activations.gelu,
    "keras.ops.sigmoid": keras.ops.sigmoid,
    "keras.ops.tanh": keras.ops.tanh,
    "leaky_relu": functools.partial(keras.activations.leaky_relu, negative_slope=0.1),
}


@pytest.mark.parametrize("name", sorted(OPERATION_ACTIVATIONS))
def test_lint_sees_an_activation_written_as_an_operation(name):
    """0.5 said nothing about a BatchNormalization after `keras.ops.silu(x)`."""
    inputs = keras.Input((4,))
    hidden = OPERATION_ACTIVATIONS[name](layers.Dense(3, use_bias=False, name="d")(inputs))
    model = keras.Model(inputs, layers.BatchNormalization(name="bn")(hidden))
    findings = bnseq.lint(model)
    assert [(finding.code, finding.layer) for finding in findings] == [("BN002", "bn")]
    assert "comes after the nonlinearity of" in findings[0].message
    (decision,) = bnseq.fold_report(model)
    assert not decision.folded and "which is not a linear layer" in decision.reason


class OpsActivation(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv1D(4, 3, use_bias=False, padding="same")
        self.bn = layers.BatchNormalization()

    def call(self, x):
        return self.bn(keras.ops.gelu(self.conv(x)))


def test_lint_sees_an_operation_activation_inside_a_traced_block():
    model = _model_of(OpsActivation(), shape=(6, 2))
    findings = bnseq.lint(model)
    assert [finding.code for finding in findings] == ["BN002"]


def test_an_ordinary_operation_before_a_batch_norm_is_no_finding():
    inputs = keras.Input((4,))
    hidden = keras.ops.multiply(layers.Dense(3, use_bias=False)(inputs), 2.0)
    model = keras.Model(inputs, layers.BatchNormalization()(hidden))
    assert bnseq.lint(model) == []


def test_bn003_through_an_ops_concatenate_of_channels_first_convolutions():
    inputs = keras.Input((2, 6, 6))
    left = layers.Conv2D(3, 1, use_bias=False, data_format="channels_first")(inputs)
    right = layers.Conv2D(3, 1, use_bias=False, data_format="channels_first")(inputs)
    merged = keras.ops.concatenate([left, right], axis=1)
    model = keras.Model(inputs, layers.BatchNormalization(name="bn")(merged))
    findings = bnseq.lint(model)
    assert [(finding.code, finding.layer) for finding in findings] == [("BN003", "bn")]
    assert "axis=1" in findings[0].message


# 11. recalibrate's data: a list of batches, a path, nothing ------------------------------


def _dense_model(inputs=1):
    tensors = [keras.Input((3,), name=f"in{index}") for index in range(inputs)]
    merged = tensors[0] if inputs == 1 else layers.Concatenate()(tensors)
    return bnseq.Sequential([keras.Input((3,)), layers.Dense(4, name="d")], batch_norm=True) if inputs == 1 else (
        keras.Model(tensors, layers.BatchNormalization(name="bn")(layers.Dense(4, use_bias=False)(merged)))
    )


def test_recalibrate_takes_a_python_list_of_batches():
    """0.5 read a list of batches as a list of inputs: "takes 1 input(s), but a batch of the data holds 2"."""
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, size=(30, 3)).astype("float32")
    model = _dense_model()
    whole = bnseq.recalibrate(model, x, batch_size=10, verbose=0)
    mean = keras.ops.convert_to_numpy(model.layers[-1].moving_mean).copy()
    listed = bnseq.recalibrate(model, [x[:10], x[10:20], x[20:]], verbose=0)
    assert whole[0].samples == listed[0].samples == 30
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.layers[-1].moving_mean), mean, rtol=1e-6)
    # (x, y) pairs, as a list of training batches often is
    pairs = bnseq.recalibrate(model, [(x[:15], None), (x[15:], None)], verbose=0)
    assert pairs[0].samples == 30


def test_a_list_with_one_array_per_input_is_still_the_inputs():
    rng = np.random.default_rng(6)
    model = _dense_model(inputs=2)
    a, b = (rng.standard_normal((12, 3)).astype("float32") for _ in range(2))
    report = bnseq.recalibrate(model, [a, b], batch_size=4, verbose=0)
    assert report[0].samples == 12
    batches = bnseq.recalibrate(model, [[a[:6], b[:6]], [a[6:], b[6:]]], verbose=0)
    assert batches[0].samples == 12


@pytest.mark.parametrize("data, error, message", [
    ("x.npy", TypeError, r"takes the data itself, not a path: load it first, e.g. `np.load\('x.npy'\)`"),
    (None, ValueError, r"recalibrate needs data: .* Received: data=None"),
])
def test_recalibrate_refuses_a_path_or_nothing_and_leaves_the_model(data, error, message):
    model = _dense_model()
    before = variables_of(model)
    with pytest.raises(error, match=message):
        bnseq.recalibrate(model, data)
    assert_unchanged(model, before)


# 8. The callback and one-shot iterators -------------------------------------------------


def _batches(x, size):
    for start in range(0, len(x), size):
        yield x[start : start + size]


def test_recalibrate_callback_refuses_a_generator_it_would_use_up():
    """0.5 used the generator up in the first epoch; the second epoch's fit crashed."""
    x = np.random.default_rng(7).standard_normal((20, 3)).astype("float32")
    with pytest.raises(TypeError, match=r"a generator is used up by the first\. .* or steps=N"):
        bnseq.callbacks.Recalibrate(_batches(x, 5))


def test_recalibrate_callback_reads_a_generator_once_with_steps():
    rng = np.random.default_rng(8)
    x = rng.normal(3.0, 2.0, size=(40, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = _dense_model()
    model.compile(optimizer="sgd", loss="mse")
    callback = bnseq.callbacks.Recalibrate(_batches(x, 10), steps=2)
    model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    assert [report[0].samples for _, report in callback.reports] == [20, 20, 20]  # each epoch; none left at the end


# 7. Export with input names the runtimes rewrite ---------------------------------------


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras exports ONNX, LiteRT and SavedModel "
                    "from TensorFlow")
@pytest.mark.parametrize("name, suffix", [
    ("image:0", ".onnx"), ("image:0", ".tflite"), ("image:0", ""), ("image input", ".tflite"), ("x-1", ""),
])
def test_export_matches_input_names_the_runtimes_rewrite(tmp_path, name, suffix):
    """0.5: "inputs (image:0, meta) cannot be matched with the model's (image:0, meta)"."""
    pytest.importorskip({".onnx": "onnxruntime", ".tflite": "ai_edge_litert"}.get(suffix, "tensorflow"))
    a, b = keras.Input((4,), name=name), keras.Input((2,), name="meta")
    hidden = layers.Concatenate()([layers.Dense(3)(a), layers.Dense(3)(b)])
    model = keras.Model([a, b], layers.Dense(2)(hidden))
    rng = np.random.default_rng(9)
    sample = [rng.standard_normal((5, 4)).astype("float32"), 10 * rng.standard_normal((5, 2)).astype("float32")]
    path = tmp_path / f"model{suffix or '_saved'}"
    renamed = suffix != ".onnx" and name != "x-1"  # a TensorFlow signature cannot hold ":" or " "
    with pytest.warns(UserWarning, match=f"cannot hold the input name '{name}'") if renamed else _no_warning():
        report = bnseq.export(model, path, sample=sample)
    assert report.max_rel < 1e-5  # a swap of the two inputs would be far off: they differ in shape and scale


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


# 6. Blocks with fixed inner names ----------------------------------------------------------


class TemporalBlock(layers.Layer):
    """A temporal convnet block as people write it: the same inner names in every instance."""

    def __init__(self, filters, dilation, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv1D(filters, 3, padding="causal", dilation_rate=dilation, use_bias=False, name="conv")
        self.bn = layers.BatchNormalization(name="bn")
        self.act = layers.Activation("relu", name="act")

    def call(self, x):
        return self.act(self.bn(self.conv(x)))


def test_a_temporal_convnet_of_blocks_with_fixed_inner_names_folds():
    """0.5 refused: "give the layers unique names"."""
    inputs = keras.Input((16, 2))
    hidden = inputs
    for index, dilation in enumerate((1, 2, 4)):
        hidden = TemporalBlock(4, dilation, name=f"block_{index}")(hidden)
    model = keras.Model(inputs, layers.Dense(1)(layers.GlobalAveragePooling1D()(hidden)))
    randomize_statistics(model)
    before = variables_of(model)
    folded = bnseq.fold(model)
    assert all(decision.folded for decision in bnseq.fold_report(model))
    names = [layer.name for layer in folded.layers]
    assert len(names) == len(set(names)) and "block_1_conv" in names and "block_2_conv" in names
    x = np.random.default_rng(10).standard_normal((4, 16, 2)).astype("float32")
    assert relative_error(model, folded, x) < 1e-5
    assert_unchanged(model, before)


# 12. The channel axis through recurrent layers and TimeDistributed -----------------------


@pytest.mark.parametrize("make", [
    lambda: layers.LSTM(5, return_sequences=True),
    lambda: layers.GRU(5, return_sequences=True),
    lambda: layers.Bidirectional(layers.SimpleRNN(3, return_sequences=True)),
    lambda: layers.TimeDistributed(layers.Dense(5)),
])
def test_auto_axis_after_recurrent_and_time_distributed_layers(make):
    """0.5 refused axis="auto" there, listing causes that did not apply."""
    inputs = keras.Input((7, 4))
    bn = bnseq.BatchNormalization()
    model = keras.Model(inputs, bn(make()(inputs)))
    assert bn.axis == -1
    assert bnseq.lint(model) == []


def test_auto_axis_after_time_distributed_channels_first_convolution():
    inputs = keras.Input((3, 2, 6, 6))  # (time, channels, height, width)
    conv = layers.TimeDistributed(layers.Conv2D(4, 3, padding="same", data_format="channels_first"))
    bn = bnseq.BatchNormalization()
    bn(conv(inputs))
    assert bn.axis == 2


def test_auto_axis_error_names_the_layer_it_could_not_read_through():
    inputs = keras.Input((4, 6))
    moved = layers.Permute((2, 1), name="swap")(inputs)
    flattened = layers.Reshape((24, 1), name="flat")(moved)
    with pytest.raises(ValueError, match=r"its rank-3 input: it comes from Reshape 'flat', which moves or merges axes"):
        bnseq.BatchNormalization()(flattened)


# 13. What the docstrings promise ------------------------------------------------------


def test_a_sequential_holding_a_traced_block_comes_back_functional_as_documented():
    model = keras.Sequential([keras.Input((3,)), DefaultTrue(), layers.Dense(2)])
    model(np.zeros((2, 3), "float32"))
    for result in (bnseq.batch_normalize(model), bnseq.fold(model)):
        assert not isinstance(result, keras.Sequential) and type(result).__name__ == "Functional"


def test_a_subclassed_model_that_traces_folds_and_one_that_does_not_raises_type_error():
    class Traced(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = layers.Dense(4, use_bias=False)
            self.bn = layers.BatchNormalization()

        def call(self, x):
            return self.bn(self.dense(x))

    class Branching(Traced):
        def call(self, x):
            y = self.dense(x)
            return y if keras.ops.convert_to_numpy(keras.ops.sum(y)) > 0 else self.bn(y)

    traced = Traced()
    traced(np.zeros((2, 3), "float32"))
    assert type(bnseq.fold(traced)).__name__ == "Functional"
    branching = Branching()
    branching(np.ones((2, 3), "float32"))
    with pytest.raises(TypeError, match=r"fold could not read Branching 'branching', a subclassed model: "):
        bnseq.fold(branching)


# Issue 33 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"center": False}, {"scale": False}, {"center": False, "scale": False}])
def test_batch_normalize_with_data_keeps_predictions_without_center_or_scale(options):
    """0.5 skipped the missing beta or gamma: 110-128% off."""
    rng = np.random.default_rng(11)
    inputs = keras.Input((5,))
    hidden = layers.Dense(4, activation="relu")(inputs)
    model = keras.Model(inputs, layers.Dense(3)(layers.Dense(6)(hidden)))
    for layer in model.layers[1:]:
        layer.bias.assign(rng.normal(2.0, 1.0, layer.bias.shape))
    x = rng.normal(1.0, 2.0, size=(40, 5)).astype("float32")
    rebuilt = bnseq.batch_normalize(model, options, data=x, batch_size=8)
    bns = [layer for layer in rebuilt.layers if isinstance(layer, layers.BatchNormalization)]
    assert len(bns) == 3 and all(getattr(bn, key) == value for bn in bns for key, value in options.items())
    assert relative_error(model, rebuilt, x) < 1e-4


def test_batch_normalize_of_an_unbuilt_sequential_with_a_batch_norm():
    """0.5: AttributeError: 'NoneType' object has no attribute 'assign'."""
    model = keras.Sequential([layers.Dense(4), layers.BatchNormalization(), layers.Dense(2)])
    rebuilt = bnseq.batch_normalize(model)
    assert not rebuilt.built
    rebuilt.build((None, 3))
    assert [type(layer).__name__ for layer in rebuilt.layers] == [
        "Dense", "BatchNormalization", "Dense", "BatchNormalization"
    ]
    assert not rebuilt.layers[0].use_bias


@pytest.mark.parametrize("strict", ["no", 1, None])
def test_fold_strict_must_be_a_bool(strict):
    model = bnseq.Sequential([keras.Input((3,)), layers.Dense(2)], batch_norm=True)
    with pytest.raises(TypeError, match=r"`strict` must be True or False\. Received: strict="):
        bnseq.fold(model, strict=strict)


def test_bn003_after_time_distributed_channels_first_convolution():
    """0.5 took axis=-1 there without a word, and lint was silent."""
    inputs = keras.Input((3, 2, 6, 6))
    conv = layers.TimeDistributed(layers.Conv2D(6, 1, use_bias=False, data_format="channels_first"))(inputs)
    model = keras.Model(inputs, layers.BatchNormalization(axis=-1, name="bn")(conv))  # width 6 == channels 6
    findings = bnseq.lint(model)
    assert [(finding.code, finding.layer) for finding in findings] == [("BN003", "bn")]
    assert "axis=2" in findings[0].message


def test_batch_normalize_leaves_a_batch_norm_shared_by_two_layers_shared():
    """0.5 crashed with Keras's "name used 2 times"."""
    rng = np.random.default_rng(12)
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
    shared = layers.BatchNormalization(name="shared_bn")
    left = shared(layers.Dense(4, name="left")(a))
    right = shared(layers.Dense(4, name="right")(b))
    model = keras.Model([a, b], layers.Add()([left, right]))
    randomize_statistics(model)
    x = [rng.standard_normal((16, 3)).astype("float32") for _ in range(2)]
    rebuilt = bnseq.batch_normalize(model, data=x, batch_size=8)
    assert rebuilt.get_layer("shared_bn") is shared
    assert len([node for node in shared._inbound_nodes]) >= 2
    assert relative_error(model, rebuilt, x) < 1e-4
    assert not any(finding.code == "BN001" for finding in bnseq.lint(rebuilt))


LEAKY_WRITTEN = {
    "partial leaky_relu": lambda: layers.Activation(
        functools.partial(keras.activations.leaky_relu, negative_slope=0.05)
    ),
    "partial relu slope": lambda: layers.Activation(functools.partial(keras.activations.relu, negative_slope=0.05)),
    "lambda": lambda: layers.Lambda(lambda t: keras.ops.leaky_relu(t, 0.05)),
}


def _conv_add_then(make_activation):
    inputs = keras.Input((6, 6, 2))
    conv = layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv")(inputs)
    other = layers.Conv2D(3, 1, name="other")(inputs)
    added = layers.Add()([layers.BatchNormalization(name="bn")(conv), other])
    model = keras.Model(inputs, make_activation()(added))
    randomize_statistics(model)
    return model


@pytest.mark.parametrize("written", sorted(LEAKY_WRITTEN))
def test_the_leaky_relu_fusion_guard_reads_what_the_activation_computes(written, monkeypatch):
    """0.5 saw LeakyReLU only as a layer or ops.leaky_relu: written as a partial or a Lambda, predict was 6-18% off
    under TensorFlow with oneDNN. Here the unsound fusion is assumed, to test the decision on any machine."""
    from bnseq.deciding import guards

    monkeypatch.setattr(guards.probes, "leaky_relu_fusion_is_sound", lambda: False)
    (decision,) = bnseq.fold_report(_conv_add_then(LEAKY_WRITTEN[written]))
    assert not decision.folded and "LeakyReLU" in decision.reason
    (plain,) = bnseq.fold_report(_conv_add_then(lambda: layers.Activation("relu")))
    assert plain.folded


@pytest.mark.parametrize("written", sorted(LEAKY_WRITTEN))
def test_fold_before_an_add_and_a_leaky_relu_however_written_keeps_predict(written):
    """On this machine's TensorFlow, oneDNN on or off (.ci/run runs it both ways)."""
    model = _conv_add_then(LEAKY_WRITTEN[written])
    x = np.random.default_rng(13).standard_normal((4, 6, 6, 2)).astype("float32")
    folded = bnseq.fold(model, safe_mode=False)
    assert relative_error(model, folded, x) < 1e-4


def test_an_activation_object_used_in_two_branches_is_not_merged_into_one():
    """0.5 merged it into the folded Dense: the other branch lost its relu (difference 2.57)."""
    inputs = keras.Input((4,))
    relu = layers.Activation("relu", name="relu")
    left = relu(layers.BatchNormalization(name="bn")(layers.Dense(3, use_bias=False)(inputs)))
    right = relu(layers.Dense(3)(inputs))
    model = keras.Model(inputs, layers.Concatenate()([left, right]))
    randomize_statistics(model)
    (decision,) = bnseq.fold_report(model)
    assert decision.folded
    folded = bnseq.fold(model)
    x = np.random.default_rng(14).standard_normal((16, 4)).astype("float32")
    assert relative_error(model, folded, x) < 1e-5
    assert folded.get_layer("relu") is relu


def test_under_mixed_precision_the_float32_softmax_stays_float32():
    """0.5 merged Activation("softmax", dtype="float32") into the bfloat16 Dense: bfloat16 outputs, 1% off."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((6,))
        hidden = layers.BatchNormalization()(layers.Dense(5, use_bias=False)(inputs))
        model = keras.Model(inputs, layers.Activation("softmax", dtype="float32", name="probabilities")(hidden))
    finally:
        keras.config.set_dtype_policy(previous)
    randomize_statistics(model)
    folded = bnseq.fold(model)
    assert folded.get_layer("probabilities").dtype_policy.name == "float32"
    x = np.random.default_rng(15).standard_normal((8, 6)).astype("float32")
    outputs = folded.predict(x, verbose=0)
    assert outputs.dtype == np.float32
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, rtol=1e-6)
    assert relative_error(model, folded, x) < 2e-2  # bfloat16 inside: the folded kernel is rounded once more


def _dict_model():
    first, second = keras.Input((3,), name="b"), keras.Input((3,), name="a")  # keys and names disagree
    merged = layers.Concatenate()([layers.Dense(2, use_bias=False)(first), second])
    return keras.Model({"first": first, "second": second}, layers.BatchNormalization(name="bn")(merged))


def test_recalibrate_matches_a_dict_of_inputs_by_name():
    """0.5 matched by sorted key order: a misspelled key was accepted and inputs were swapped (mean -5, not 10)."""
    rng = np.random.default_rng(16)
    model = _dict_model()
    first = rng.normal(0.0, 1.0, (20, 3)).astype("float32")
    second = rng.normal(10.0, 1.0, (20, 3)).astype("float32")
    for data in ({"first": first, "second": second}, {"b": first, "a": second}):
        bnseq.recalibrate(model, data, batch_size=10, verbose=0)
        mean = keras.ops.convert_to_numpy(model.get_layer("bn").moving_mean)
        np.testing.assert_allclose(mean[2:], second.mean(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match=r"takes a dict with the keys \['first', 'second'\].*missing \['first'\]"):
        bnseq.recalibrate(model, {"frist": first, "second": second}, verbose=0)
    rebuilt = bnseq.batch_normalize(model, data={"b": first, "a": second}, batch_size=10)
    assert relative_error(model, rebuilt, {"first": first, "second": second}) < 1e-4


@pytest.mark.parametrize("make", [
    lambda: layers.Conv2D(4, 3, padding="same", use_bias=False, data_format="channels_first"),
    lambda: layers.Conv2DTranspose(4, 3, padding="same", use_bias=False, data_format="channels_first"),
    lambda: layers.DepthwiseConv2D(3, padding="same", use_bias=False, data_format="channels_first"),
])
def test_channels_first_bias_guard_with_unknown_spatial_sizes(make):
    """0.5 looked only at fixed shapes: with Input((C, None, None)) it folded, 31-127% off where width == channels."""
    inputs = keras.Input((4, None, None))
    model = keras.Model(inputs, layers.BatchNormalization(axis=1)(make()(inputs)))
    randomize_statistics(model)
    (decision,) = bnseq.fold_report(model)
    x = np.random.default_rng(17).standard_normal((2, 4, 5, 4)).astype("float32")  # width 4 == channels 4
    if probes.bias_add_is_sound():
        assert decision.folded
    else:
        assert not decision.folded and "along the last axis" in decision.reason
    folded = bnseq.fold(model)
    for run in (probes.predicted, probes.infer):
        expected, actual = run(model, x), run(folded, x)
        assert float(np.abs(expected - actual).max() / np.abs(expected).max()) < 1e-4
