"""`bnseq.freeze` / `unfreeze`: frozen BatchNormalization holds bit for bit in `fit`, however it was frozen.

The matrix of issue 30: six ways of freezing (the transfer-learning guide's
`base(x, training=False)`, `BatchNormalization()(x, training=False)` written
directly, after `compile`, after `fit`, inside a subclassed block, across a
`.keras` round trip), each measured twice on the backend the suite runs on:
what Keras alone does (statistics move wherever Keras overrides or ignores the
user's freeze), and what it does after `bnseq.freeze` (they move by exactly 0,
while every other layer trains). `.ci/run` runs this module on TensorFlow, JAX
and PyTorch, and on the oldest Keras setup.cfg allows.
"""

import keras
import numpy as np
import pytest

import bnseq
from bnseq import probes

BACKEND = keras.backend.backend()
WAYS = ["guide", "direct", "after_compile", "after_fit", "subclassed", "save_load"]


@keras.saving.register_keras_serializable(package="bnseq_tests")
class Block(keras.layers.Layer):
    """A subclassed block with a BatchNormalization inside its call()."""

    def __init__(self, units=6, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, use_bias=False, name="block_dense")
        self.bn = keras.layers.BatchNormalization(name="block_bn")

    def build(self, input_shape):
        self.dense.build(input_shape)
        self.bn.build((*input_shape[:-1], self.units))

    def call(self, inputs, training=None):
        return keras.ops.relu(self.bn(self.dense(inputs), training=training))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def data(n=32, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(n, 4)).astype("float32")  # far from the statistics the layers start with
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def pretrained(way):
    """A small model whose BatchNormalization has statistics of other data, built the `way` it is frozen."""
    inputs = keras.Input((4,), name="x")
    if way == "guide":
        base_inputs = keras.Input((4,))
        h = keras.layers.Dense(6, use_bias=False, name="conv")(base_inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        base = keras.Model(base_inputs, keras.layers.Activation("relu")(h), name="base")
        base.trainable = True  # unfrozen for fine-tuning, as the guide's second step does
        h = base(inputs, training=False)
    elif way == "direct":
        h = keras.layers.Dense(6, use_bias=False, name="conv")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h, training=False)
        h = keras.layers.Activation("relu")(h)
    elif way == "subclassed":
        h = Block(name="block")(inputs)
    else:
        h = keras.layers.Dense(6, use_bias=False, name="conv")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = keras.layers.Activation("relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h), name="model")
    bn = batch_norm_of(model)
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(size=6).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=6).astype("float32"))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=6).astype("float32"))
    return model


def batch_norm_of(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)][0]


def values(model):
    """Every variable of the model by path, as NumPy."""
    return {variable.path: np.array(keras.ops.convert_to_numpy(variable)) for variable in model.variables}


def fit(model, epochs=1):
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False)


def compiled(model):
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def run(way, freeze, tmp_path):
    """Freeze the `way` it is done, with bnseq (`freeze=True`) or with Keras alone; fit; the model fitted."""
    model = pretrained(way)
    bn = batch_norm_of(model)

    def hold():
        if freeze:
            bnseq.freeze(model)
        elif way not in ("guide", "direct"):  # those two rely on the recorded training=False alone
            bn.trainable = False

    if way == "after_compile":
        compiled(model)
        hold()
    elif way == "after_fit":
        compiled(model)
        fit(model)
        hold()
    elif way == "save_load":
        hold()
        compiled(model)
        path = tmp_path / "frozen.keras"
        model.save(path)
        model = keras.saving.load_model(path)
    elif way == "subclassed":
        if freeze:
            hold()
        compiled(model)
    else:
        hold()
        compiled(model)
    before = values(model)
    fit(model)
    return model, before


def moved(model, before, names=("moving_mean", "moving_variance", "gamma", "beta")):
    """The largest change of the BatchNormalization's variables and of every other layer's weights."""
    after = values(model)
    bn = [path for path in after if path.rsplit("/", 1)[-1] in names and "bn" in path]
    others = [path for path in after if path not in bn and "seed" not in path]
    change = {path: float(np.max(np.abs(after[path] - before[path]))) for path in after}
    return max(change[path] for path in bn), max(change[path] for path in others)


@pytest.mark.parametrize("way", WAYS)
def test_freeze_holds_statistics_and_affine_bit_for_bit(way, tmp_path):
    model, before = run(way, freeze=True, tmp_path=tmp_path)
    held, trained = moved(model, before)
    assert held == 0.0
    assert trained > 1e-4  # the rest of the model trained


@pytest.mark.parametrize("way", WAYS)
def test_without_bnseq_statistics_move_where_keras_overrides_the_freeze(way, tmp_path):
    """What Keras alone does with the same freeze, measured: the pitfall bnseq.freeze closes."""
    if way == "after_fit" and BACKEND == "jax":
        with pytest.raises(ValueError, match="optimizer"):
            run(way, freeze=False, tmp_path=tmp_path)
        return
    model, before = run(way, freeze=False, tmp_path=tmp_path)
    held, _ = moved(model, before, names=("moving_mean", "moving_variance"))
    if way in ("guide", "direct"):
        pitfall = probes.recorded_training_is_overridden(nested=way == "guide")
    else:
        pitfall = way == "subclassed" or (way == "after_fit" and BACKEND == "tensorflow")
    assert (held > 0.0) == pitfall, (way, held)


def test_statistics_only_lets_gamma_and_beta_train_on_frozen_statistics():
    model = compiled(pretrained("plain"))
    fit(model)  # compiled and trained before: the train step is reset
    report = bnseq.freeze(model, affine=False)
    bn = batch_norm_of(model)
    assert isinstance(bn, bnseq.FrozenBatchNormalization) and bn.trainable
    assert [(row.statistics, row.affine) for row in report] == [(True, False)]
    before = values(model)
    x = data()[0][:8]
    fit(model)
    statistics, _ = moved(model, before, names=("moving_mean", "moving_variance"))
    affine, _ = moved(model, before, names=("gamma", "beta"))
    assert statistics == 0.0 and affine > 1e-4
    # It normalizes with its moving statistics in training mode too.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x, training=True)), keras.ops.convert_to_numpy(model(x, training=False))
    )


def test_affine_only_lets_statistics_train():
    model = compiled(pretrained("plain"))
    bnseq.freeze(model, statistics=False)
    before = values(model)
    fit(model)
    statistics, _ = moved(model, before, names=("moving_mean", "moving_variance"))
    affine, trained = moved(model, before, names=("gamma", "beta"))
    assert statistics > 1e-3 and affine == 0.0 and trained > 1e-4


@pytest.mark.parametrize("affine", [True, False])
def test_a_partial_freeze_survives_a_keras_round_trip(affine, tmp_path):
    model = pretrained("plain")
    bnseq.freeze(model, statistics=not affine or True, affine=affine)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    original, restored = batch_norm_of(model), batch_norm_of(loaded)
    assert type(restored) is type(original) and restored.trainable == original.trainable
    assert getattr(restored, "frozen", None) == getattr(original, "frozen", None)
    compiled(loaded)
    before = values(loaded)
    fit(loaded)
    statistics, _ = moved(loaded, before, names=("moving_mean", "moving_variance"))
    assert statistics == 0.0


def test_unfreeze_after_fit_trains_again_with_the_optimizer_state_kept():
    model = compiled(pretrained("plain"))
    bnseq.freeze(model)
    fit(model)  # the optimizer is built without the BatchNormalization's gamma and beta
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    moments = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables}
    report = bnseq.unfreeze(model)
    assert [row.before for row in report] == ["frozen"]
    assert "optimizer" in report.rebuilt  # Keras refuses a variable its optimizer was not built with
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == iterations
    kernel_moment = [path for path in moments if "conv_kernel_momentum" in path][0]
    carried = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables}
    np.testing.assert_array_equal(carried[kernel_moment], moments[kernel_moment])
    before = values(model)
    fit(model)
    statistics, _ = moved(model, before, names=("moving_mean", "moving_variance"))
    assert statistics > 1e-3 and batch_norm_of(model).trainable


def test_freeze_after_fit_keeps_the_optimizer_state_of_what_still_trains():
    model = compiled(pretrained("plain"))
    fit(model)
    kept = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables}
    report = bnseq.freeze(model)
    assert "train step" in report.rebuilt
    assert ("optimizer" in report.rebuilt) == (BACKEND == "jax")
    now = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables}
    for path, value in now.items():
        np.testing.assert_array_equal(value, kept[path])
    assert not any("bn_gamma" in path for path in now) or BACKEND != "jax"


def test_layers_takes_names_objects_and_containers():
    model = pretrained("guide")
    base = model.get_layer("base")
    assert [row.batch_norm for row in bnseq.freeze(model, layers="bn")] == ["bn"]
    bnseq.unfreeze(model)
    assert [row.path for row in bnseq.freeze(model, layers=[base])] == ["model/base/bn"]
    assert [row.batch_norm for row in bnseq.freeze(model, layers=base.get_layer("bn"))] == ["bn"]


@pytest.mark.parametrize(
    "layers, error, match",
    [
        ("nothing", ValueError, "no layer named 'nothing'.*'bn'"),
        ("head", ValueError, "holds none"),
        ([3], TypeError, "layers and layer names"),
    ],
)
def test_bad_layers_are_refused_and_nothing_changes(layers, error, match):
    model = pretrained("guide")
    with pytest.raises(error, match=match):
        bnseq.freeze(model, layers=layers)
    assert batch_norm_of(model).trainable


def test_a_layer_outside_the_model_is_refused():
    model = pretrained("plain")
    with pytest.raises(ValueError, match="is not a layer of model 'model'"):
        bnseq.freeze(model, layers=keras.layers.BatchNormalization(name="stray"))


def test_nothing_to_hold_is_refused():
    with pytest.raises(ValueError, match="hold nothing.*unfreeze"):
        bnseq.freeze(pretrained("plain"), statistics=False, affine=False)
    with pytest.raises(TypeError, match="True or False"):
        bnseq.freeze(pretrained("plain"), affine="no")


def test_a_partial_freeze_refuses_a_subclass_it_does_not_know():
    class Custom(keras.layers.BatchNormalization):
        pass

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Custom(name="custom")(keras.layers.Dense(3, use_bias=False)(inputs)))
    with pytest.raises(ValueError, match="Custom.*Freeze it whole"):
        bnseq.freeze(model, affine=False)
    assert type(model.layers[-1]) is Custom and model.layers[-1].trainable
    bnseq.freeze(model)  # whole: Keras's own switch
    assert not model.layers[-1].trainable


def test_unfreeze_undoes_freeze_exactly_and_respects_a_frozen_parent():
    model = pretrained("guide")
    bn = model.get_layer("base").get_layer("bn")
    bnseq.freeze(model, affine=False)
    bnseq.freeze(model)  # frozen again, whole: unfreeze returns to before the first freeze
    bnseq.unfreeze(model)
    assert type(bn) is keras.layers.BatchNormalization and bn.trainable and bn.gamma.trainable
    model.get_layer("base").trainable = False
    report = bnseq.unfreeze(model)
    assert not bn.trainable and "left frozen" in report[0].note


# recalibrate and the Recalibrate callback leave a frozen layer alone ----------------------------


def two_batch_norms():
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, use_bias=False, name="first")(inputs)
    h = keras.layers.BatchNormalization(name="bn_first")(h)
    h = keras.layers.Dense(5, use_bias=False, name="second")(keras.layers.Activation("relu")(h))
    h = keras.layers.BatchNormalization(name="bn_second")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(h), name="two")


def test_recalibrate_leaves_a_frozen_layer_alone_unless_asked():
    model = two_batch_norms()
    first = model.get_layer("bn_first")
    bnseq.freeze(model, layers="bn_first")
    held = values(model)
    x = data()[0]
    report = bnseq.recalibrate(model, x, verbose=0)
    assert [row.batch_norm for row in report] == ["bn_second"] and report.frozen == ("bn_first",)
    assert "left alone, their statistics frozen: bn_first" in str(report)
    after = values(model)
    for path in ("bn_first/moving_mean", "bn_first/moving_variance"):
        np.testing.assert_array_equal(after[path], held[path])
    # bn_second's statistics are those of its input with bn_first as it is (frozen, not recalibrated).
    inner = keras.Model(model.inputs, model.get_layer("second").output)
    expected = keras.ops.convert_to_numpy(inner.predict(x, verbose=0)).mean(axis=0)
    np.testing.assert_allclose(after["bn_second/moving_mean"], expected, rtol=1e-5, atol=1e-6)
    report = bnseq.recalibrate(model, x, verbose=0, include_frozen=True)
    assert [row.batch_norm for row in report] == ["bn_first", "bn_second"] and report.frozen == ()
    assert not first.trainable  # still frozen: only its statistics were set, as asked


def test_recalibrate_refuses_when_everything_is_frozen():
    model = two_batch_norms()
    bnseq.freeze(model)
    held = values(model)
    with pytest.raises(ValueError, match="every BatchNormalization.*include_frozen=True"):
        bnseq.recalibrate(model, data()[0], verbose=0)
    assert all(np.array_equal(values(model)[path], value) for path, value in held.items())


def test_the_recalibrate_callback_keeps_frozen_statistics():
    model = compiled(two_batch_norms())
    bnseq.freeze(model, layers=["bn_first"])
    held = values(model)
    x, y = data()
    callback = bnseq.callbacks.Recalibrate(x, batch_size=16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    after = values(model)
    for path in ("bn_first/moving_mean", "bn_first/moving_variance", "bn_first/gamma"):
        np.testing.assert_array_equal(after[path], held[path])
    assert [row.batch_norm for _, report in callback.reports for row in report] == ["bn_second"]
    bnseq.freeze(model)
    with pytest.raises(ValueError, match="nothing to set"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[bnseq.callbacks.Recalibrate(x)])


def test_no_recompile_warning_after_freeze():
    """Keras 3.15 warns in fit that a changed `trainable` needs a new compile; after freeze it does not."""
    import warnings

    model = compiled(pretrained("plain"))
    fit(model)
    bnseq.freeze(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model)
    assert not [each for each in caught if "trainable" in str(each.message)]


@pytest.mark.parametrize("part", ["statistics", "affine"])
def test_a_partly_frozen_model_folds_lints_and_summarizes(part):
    model = pretrained("plain")
    bnseq.freeze(model, statistics=part == "statistics", affine=part == "affine")
    folded = bnseq.fold(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    x = data()[0][:8]
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    assert bnseq.lint(model) == []
    (row,) = bnseq.summary(model)
    assert row.trains_statistics == (part == "affine") and row.fold == "into conv"


def test_a_failure_while_making_the_model_ready_leaves_it_as_it_was(monkeypatch):
    from bnseq.changing import freezing

    model = compiled(pretrained("plain"))
    bnseq.freeze(model)
    fit(model)  # the optimizer is built without gamma and beta: unfreeze must rebuild it

    def refuse(*args):
        raise ValueError("cannot rebuild")

    monkeypatch.setattr(freezing, "rebuilt_optimizer", refuse)
    optimizer = model.optimizer
    with pytest.raises(ValueError, match="cannot rebuild"):
        bnseq.unfreeze(model)
    bn = batch_norm_of(model)
    assert not bn.trainable and type(bn) is keras.layers.BatchNormalization and model.optimizer is optimizer
    monkeypatch.undo()
    bnseq.unfreeze(model)  # the record of its state before the first freeze is still there
    assert bn.trainable


@pytest.mark.parametrize("part", ["whole", "statistics", "affine"])
@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_batch_normalize_keeps_a_taken_over_layer_frozen(part, kind):
    if kind == "functional":
        model = pretrained("plain")
    else:
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(6, name="conv"), keras.layers.BatchNormalization(name="bn")]
        )
    options = {"whole": {}, "statistics": {"affine": False}, "affine": {"statistics": False}}[part]
    bnseq.freeze(model, layers="bn", **options)
    rewritten = bnseq.batch_normalize(model)
    (taken,) = [layer for layer in rewritten._flatten_layers() if layer.name == "bn"]
    original = batch_norm_of(model)
    assert (type(taken), taken.trainable, getattr(taken, "frozen", None)) == (
        type(original),
        original.trainable,
        getattr(original, "frozen", None),
    )
