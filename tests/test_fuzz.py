"""A differential fuzzer: random functional graphs, every bnseq result checked against an oracle.

Hypothesis draws a small model as a list of steps (linear layers of every kind
with activations as arguments, BatchNormalization before and after
activations, on the right axis or a wrong one, activation layers, residual
adds, shared layers, Permute, Flatten, a Lambda, nested functional and
Sequential models, subclassed blocks whose BatchNormalization is created
before the layer it follows). While it builds, the generator keeps its own
record, independent of bnseq: which axis holds the channels of each tensor
(or that nothing can tell), and which misplacements it planted. Then:

- `fold` equals the original under `predict` and eagerly;
- `batch_normalize(data=)` equals the original, or refuses with its
  documented reason, and its result lints clean;
- `recalibrate` equals the statistics of each BatchNormalization's input
  captured in one plain inference call (`tests/backbones.py`), and a second
  call changes nothing;
- `bnseq.BatchNormalization(axis="auto")` takes the recorded axis, or raises
  where the record says nothing can tell;
- `lint` reports exactly the planted misplacements.

The budget: the suite's Hypothesis profile (`ci`: 12 examples, derandomized;
`dev`: 12 drawn afresh each run), about 10 s. For a long run, `HYPOTHESIS_PROFILE=fuzz` (300
examples, or `BNSEQ_FUZZ_EXAMPLES`), e.g.
`HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz.py` (profiles in conftest.py).
"""

import dataclasses
import functools
import os
import tempfile
import warnings

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import layers

import bnseq
from bnseq import kinds
from bnseq import probes
from bnseq.reading.graph import walk
from tests.backbones import statistics_errors
from tests.test_never_wrong import Counting
from tests.test_never_wrong import DefaultTrue
from tests.test_never_wrong import FixedNames
from tests.test_never_wrong import ModeBranches

ACTIVATIONS = [None, "relu", "tanh"]
# 5 channels: never a spatial size here (6, 4, 2), so no channels_first layer meets Keras's eager bias bug
# (a bias added on the last axis when it has the channel count, probes.bias_add_is_sound), which would
# make the eager oracles wrong, not bnseq.
FILTERS = 5
STEPS = ["linear", "bn", "bn_wrong", "act", "skip", "concat", "shared", "nested", "sequential", "block",
         "permute", "reshape", "flatten", "lambda", "ops_act", "mode_block", "default_block", "counter_block",
         "named_block", "shared_act", "pool", "merge_linear", "repvgg"]
# Activations written as operations (lint reads them as it reads the layers).
OPS_ACTIVATIONS = [keras.ops.silu, keras.activations.relu, keras.activations.gelu, keras.ops.tanh]


@dataclasses.dataclass
class Tensor:
    """A tensor of the model being drawn, with the generator's own record of it."""

    value: object
    axis: object  # the channel axis (non-negative), or None where nothing can tell
    producer: str  # "input", "linear[_bias]", "nonlinear[_bias]" (a linear layer or activation), "bn", "other"
    name: str = ""  # the producing layer's name, for lint's findings
    uses: int = 0  # later uses besides the next step (a skip, a shared layer, a model output)


class Block(keras.layers.Layer):
    """A subclassed block: its BatchNormalization is created before the convolution it follows."""

    def __init__(self, filters, data_format, **kwargs):
        super().__init__(**kwargs)
        axis = 1 if data_format == "channels_first" else -1
        self.bn = layers.BatchNormalization(axis=axis)
        self.conv = layers.Conv2D(filters, 1, use_bias=False, data_format=data_format)

    def call(self, x):
        return self.bn(self.conv(x))


class Drawn:
    """A model drawn step by step, with what the generator expects of it."""

    def __init__(self, draw):
        self.draw = draw
        self.images = draw(st.booleans())
        formats = ["channels_last"] + (["channels_first"] if probes.channels_first_runs() else [])
        self.data_format = draw(st.sampled_from(formats)) if self.images else None
        shape = ((3, 6, 6) if self.data_format == "channels_first" else (6, 6, 3)) if self.images else (5,)
        self.inputs = keras.Input(shape)
        self.current = Tensor(self.inputs, len(shape), "input")
        self.earlier = []
        self.expected = set()  # (code, BatchNormalization name) lint must report
        self.auto = []  # (the channel axis or None, the bnseq.BatchNormalization that settled or raised)
        self.count = 0

    def name(self, kind):
        self.count += 1
        return f"fz_{kind}_{self.count}"  # never one of Keras's own names (add_3, dense_2...)

    def rank(self):
        return len(self.current.value.shape)

    def channels(self):
        return self.current.value.shape[self.current.axis] if self.current.axis is not None else None

    def push(self, value, axis, producer, name=""):
        self.earlier.append(self.current)
        self.current = Tensor(value, axis, producer, name)

    def conv_format(self):
        return self.data_format or "channels_last"

    # Steps ---------------------------------------------------------------------

    def linear(self, plain=False):
        draw, name = self.draw, self.name("linear")
        activation = None if plain else draw(st.sampled_from(ACTIVATIONS))
        use_bias = draw(st.booleans())
        if self.rank() != 4:
            layer = layers.Dense(draw(st.integers(2, 5)), activation=activation, use_bias=use_bias, name=name)
            axis = self.rank() - 1
        else:
            fmt = self.conv_format()
            spatial = self.current.value.shape[2] if fmt == "channels_first" else self.current.value.shape[1]
            kind = draw(st.sampled_from(["conv", "conv_valid", "depthwise", "separable", "transpose"]))
            if kind == "conv_valid" and spatial < 4:
                kind = "conv"
            common = dict(activation=activation, use_bias=use_bias, data_format=fmt, name=name)
            if kind == "depthwise":
                layer = layers.DepthwiseConv2D(3, padding="same", **common)
            elif kind == "separable":
                layer = layers.SeparableConv2D(FILTERS, 3, padding="same", **common)
            elif kind == "transpose":
                layer = layers.Conv2DTranspose(FILTERS, 3, padding="same", **common)
            else:
                size = draw(st.sampled_from([1, 3]))
                layer = layers.Conv2D(FILTERS, size, padding="valid" if kind == "conv_valid" else "same", **common)
            axis = 1 if fmt == "channels_first" else 3
        producer = ("nonlinear" if activation else "linear") + ("_bias" if use_bias else "")
        self.push(layer(self.current.value), axis, producer, name)

    def bn(self, wrong=False):
        name = self.name("bn")
        axis = self.current.axis
        rank = self.rank()
        if wrong and axis is not None and rank > 2:
            axis = self.draw(st.sampled_from([each for each in range(1, rank) if each != axis]))
        self.plant(name, axis if axis is not None else rank - 1, wrong=wrong and axis != self.current.axis)
        self.check_auto()
        value = layers.BatchNormalization(axis=axis if axis is not None else -1, name=name)(self.current.value)
        self.push(value, self.current.axis, "bn", name)

    def plant(self, name, axis, wrong):
        producer = self.current.producer
        if producer == "bn":
            self.expected.add(("BN004", name))
        if producer in ("nonlinear", "nonlinear_bias"):
            self.expected.add(("BN002", name))
        if producer in ("linear_bias", "nonlinear_bias"):
            self.expected.add(("BN001", name))
        if wrong:
            self.expected.add(("BN003", name))
        self.current.planted = name  # a later use of this tensor takes BN001 back

    def check_auto(self):
        auto = bnseq.BatchNormalization()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bnseq.BatchNormPlacementWarning)
            try:
                auto(self.current.value)
                settled = auto.axis % self.rank()
            except ValueError as error:
                assert "it does not guess" in str(error)
                settled = None
        self.auto.append((self.current.axis, settled))

    def act(self):
        layer = self.draw(st.sampled_from([
            lambda name: layers.ReLU(name=name), lambda name: layers.Activation("tanh", name=name),
            lambda name: layers.LeakyReLU(0.1, name=name),
            lambda name: layers.Activation(functools.partial(keras.activations.leaky_relu, negative_slope=0.05),
                                           name=name),
            lambda name: layers.Activation(functools.partial(keras.activations.relu, negative_slope=0.05),
                                           name=name),
        ]))(self.name("act"))
        self.push(layer(self.current.value), self.current.axis, "nonlinear", layer.name)

    def ops_act(self):
        value = self.draw(st.sampled_from(OPS_ACTIVATIONS))(self.current.value)
        self.push(value, self.current.axis, "nonlinear", value._keras_history.operation.name)

    def hazard_block(self, kind):
        """A subclassed block of the hazards issue 29 lists, on the last axis (vectors or channels_last)."""
        if self.rank() == 4 and self.conv_format() == "channels_first":
            return
        units = int(self.current.value.shape[-1])
        name = self.name(kind)
        if kind == "mode_block":  # branches on training, default True: not inlined, read as unseen
            block = ModeBranches(units, name=name)
        elif kind == "counter_block":  # updates a variable in call(): not inlined
            block = Counting(units, affects=False, name=name)
        elif kind == "default_block":  # a training=True default, one path: inlined in predict's mode
            block = DefaultTrue(units, name=name)
        else:  # fixed inner names, clashing with the next one's once inlined
            block = FixedNames(units, name=name)
        value = block(self.current.value)
        if kind in ("mode_block", "counter_block"):  # opaque: only a rank-2 output tells its axis
            self.expected.add(("BN000", name))
            self.push(value, 1 if self.rank() == 2 else None, "other")
        else:
            self.push(value, self.rank() - 1, "nonlinear" if kind == "default_block" else "bn", block.bn.name)

    def shared_act(self):
        """One Activation object applied to this tensor and to an earlier one of its shape, then added."""
        other = self.earlier_like_current()
        if other is None:
            return
        relu = layers.Activation("relu", name=self.name("shared_act"))
        value = layers.Add(name=self.name("add"))([relu(self.current.value), relu(other.value)])
        self.push(value, self.current.axis, "other")

    def earlier_like_current(self):
        """An earlier tensor of the current one's shape and channel axis, drawn and counted as used; or `None`."""
        shape = tuple(self.current.value.shape)
        same = [each for each in self.earlier if tuple(each.value.shape) == shape and each.axis == self.current.axis]
        if not same:
            return None
        other = self.draw(st.sampled_from(same))
        self.use(other)
        return other

    def skip(self):
        other = self.earlier_like_current()
        if other is None:
            return
        value = layers.Add(name=self.name("add"))([self.current.value, other.value])
        self.push(value, self.current.axis, "other")

    def concat(self):
        axis = self.current.axis
        shape = tuple(self.current.value.shape)
        same = [each for each in self.earlier if tuple(each.value.shape) == shape and each.axis == axis]
        if axis is None or not same:
            return
        other = self.draw(st.sampled_from(same))
        self.use(other)
        value = layers.Concatenate(axis=axis, name=self.name("concat"))([self.current.value, other.value])
        self.push(value, axis, "other")

    def reshape(self):
        shape = tuple(self.current.value.shape)
        if self.rank() != 4 or self.current.axis not in (1, 3):
            return
        if self.current.axis == 3:  # (h, w, c) -> (h * w, c)
            value = layers.Reshape((shape[1] * shape[2], shape[3]), name=self.name("reshape"))(self.current.value)
            self.push(value, 2, "other")
        else:  # (c, h, w) -> (c, h * w)
            value = layers.Reshape((shape[1], shape[2] * shape[3]), name=self.name("reshape"))(self.current.value)
            self.push(value, 1, "other")

    def shared(self):
        if self.rank() != 2:
            return
        layer = layers.Dense(int(self.current.value.shape[-1]), name=self.name("shared"))
        self.use(self.current)
        first = layer(self.current.value)
        second = layer(layers.ReLU(name=self.name("act"))(self.current.value))
        self.push(layers.Add(name=self.name("add"))([first, second]), self.current.axis, "other")

    def nested(self, sequential=False):
        shape = tuple(self.current.value.shape[1:])
        fmt = self.conv_format()
        dense = self.rank() != 4
        axis = -1 if dense or fmt == "channels_last" else 1
        linear = (layers.Dense(3, use_bias=False) if dense
                  else layers.Conv2D(FILTERS, 1, use_bias=False, data_format=fmt))
        # Open at the end (the linear layer last) half the time: a BatchNormalization drawn next, in the
        # outer model, then folds across the nested model's boundary.
        open_end = self.draw(st.booleans())
        stack = [linear] if open_end else [linear, layers.BatchNormalization(axis=axis), layers.ReLU()]
        name = self.name("nested")
        if sequential:
            inner = keras.Sequential([keras.Input(shape), *stack], name=name)
        else:
            inner_inputs = keras.Input(shape)
            x = inner_inputs
            for layer in stack:
                x = layer(x)
            inner = keras.Model(inner_inputs, x, name=name)
        new_axis = self.rank() - 1 if dense else (1 if fmt == "channels_first" else 3)
        self.push(inner(self.current.value), new_axis, "linear" if open_end else "nonlinear", stack[-1].name)

    def block(self):
        if self.rank() != 4:
            return
        block = Block(FILTERS, self.conv_format(), name=self.name("block"))
        self.push(block(self.current.value), 1 if self.conv_format() == "channels_first" else 3, "bn", block.bn.name)

    def permute(self):
        if self.rank() != 4:
            return
        axis = self.current.axis
        mapped = None if axis is None else {3: 1, 1: 2, 2: 3}[axis]  # Permute((3, 1, 2))
        self.push(layers.Permute((3, 1, 2), name=self.name("permute"))(self.current.value), mapped, "other")

    def flatten(self):
        if self.rank() != 4:
            return
        self.push(layers.Flatten(name=self.name("flatten"))(self.current.value), 1, "other")

    def lambda_(self):
        function = self.draw(st.sampled_from([lambda t: t * 1.5, lambda t: keras.ops.leaky_relu(t, 0.05)]))
        value = layers.Lambda(function, name=self.name("lambda"))(self.current.value)
        self.push(value, None if self.rank() > 2 else 1, "other")

    def pool(self):
        """Average or maximum pooling (a fold moves a BatchNormalization after it before it), or a global average."""
        if self.rank() != 4 or self.current.axis not in (1, 3):
            return
        if self.draw(st.booleans()):  # a linear layer right before: what a fold moves the BatchNormalization to
            self.linear(plain=True)
        fmt = "channels_first" if self.current.axis == 1 else "channels_last"
        kind = self.draw(st.sampled_from(["average", "max", "global"]))
        name = self.name("pool")
        if kind == "global":
            self.push(layers.GlobalAveragePooling2D(data_format=fmt, name=name)(self.current.value), 1, "other")
            return
        pool = layers.AveragePooling2D if kind == "average" else layers.MaxPooling2D
        value = pool(2, padding="same", data_format=fmt, name=name)(self.current.value)
        self.push(value, self.current.axis, "other")
        if self.draw(st.booleans()):
            self.bn()

    def merge_linear(self):
        """Two new linear layers of the current tensor, merged by Add, `+` or Concatenate (a fold splits across it)."""
        axis = self.current.axis
        if axis is None or self.rank() not in (2, 4) or (self.rank() == 4 and axis not in (1, 3)):
            return
        fmt = "channels_first" if axis == 1 and self.rank() == 4 else "channels_last"
        self.use(self.current)

        def linear(size):
            name = self.name("linear")
            if self.rank() == 2:
                return layers.Dense(3, name=name)(self.current.value)
            return layers.Conv2D(FILTERS, size, padding="same", data_format=fmt, name=name)(self.current.value)

        a, b = linear(3), linear(1)
        kind = self.draw(st.sampled_from(["add", "plus", "concat"]))
        if kind == "add":
            value = layers.Add(name=self.name("add"))([a, b])
        elif kind == "plus":
            value = a + b
        else:
            value = layers.Concatenate(axis=axis, name=self.name("concat"))([a, b])
        self.push(value, axis, "other")
        if self.draw(st.booleans()):
            self.bn()

    def repvgg(self):
        """A RepVGG block of the current tensor: 3x3 conv + BN, 1x1 conv + BN and a BN alone, summed, then ReLU."""
        if self.rank() != 4 or self.current.axis not in (1, 3):
            return
        fmt = "channels_first" if self.current.axis == 1 else "channels_last"
        channels = int(self.current.value.shape[self.current.axis])
        self.use(self.current)
        terms = []
        for size in (3, 1):
            conv = layers.Conv2D(channels, size, padding="same", use_bias=False, data_format=fmt,
                                 name=self.name("linear"))(self.current.value)
            terms.append(layers.BatchNormalization(axis=self.current.axis, name=self.name("bn"))(conv))
        name = self.name("bn")
        self.plant(name, self.current.axis, wrong=False)  # the identity branch follows what the block reads
        terms.append(layers.BatchNormalization(axis=self.current.axis, name=name)(self.current.value))
        value = layers.Add(name=self.name("add"))(terms) if self.draw(st.booleans()) else terms[0] + terms[1] + terms[2]
        self.push(layers.ReLU(name=self.name("act"))(value), self.current.axis, "nonlinear")

    def use(self, tensor):
        tensor.uses += 1

    def model(self):
        self.current.uses += 1  # the model output
        model = keras.Model(self.inputs, self.current.value)
        # A linear layer's bias is not wasted where its output also goes elsewhere.
        for tensor in [*self.earlier, self.current]:
            planted = getattr(tensor, "planted", None)
            if planted and tensor.uses:
                self.expected.discard(("BN001", planted))
        return model


@st.composite
def drawn_models(draw):
    drawn = Drawn(draw)
    drawn.linear()
    for step in draw(st.lists(st.sampled_from(STEPS), min_size=2, max_size=6)):
        {
            "linear": drawn.linear, "bn": drawn.bn, "bn_wrong": lambda: drawn.bn(wrong=True), "act": drawn.act,
            "skip": drawn.skip, "concat": drawn.concat, "reshape": drawn.reshape, "shared": drawn.shared,
            "nested": drawn.nested,
            "sequential": lambda: drawn.nested(sequential=True), "block": drawn.block, "permute": drawn.permute,
            "flatten": drawn.flatten, "lambda": drawn.lambda_, "ops_act": drawn.ops_act,
            "mode_block": lambda: drawn.hazard_block("mode_block"),
            "default_block": lambda: drawn.hazard_block("default_block"),
            "counter_block": lambda: drawn.hazard_block("counter_block"),
            "named_block": lambda: drawn.hazard_block("named_block"), "shared_act": drawn.shared_act,
            "pool": drawn.pool, "merge_linear": drawn.merge_linear, "repvgg": drawn.repvgg,
        }[step]()
    if draw(st.booleans()):
        drawn.bn()
    # The rewrite's options: batch_normalize(data=) must keep predictions without beta or gamma too.
    drawn.options = {key: draw(st.booleans()) for key in ("center", "scale")}
    return drawn, drawn.model()


def randomized(model, seed):
    """Trained-looking weights: non-zero biases, non-trivial statistics."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0.0, 0.5, channels))
        elif getattr(layer, "use_bias", False) and getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.5, layer.bias.shape))
    return model


def describe(model):
    """The model's layers, nested ones included, for a failure's message."""
    return [(type(layer).__name__, layer.name, getattr(layer, "axis", None)) for layer in model._flatten_layers()]


def state(model):
    """Every variable of the model as NumPy copies (RNN states, counters and seeds included), by position."""
    return [(variable, np.array(keras.ops.convert_to_numpy(variable.value), copy=True))
            for variable in probes.state_of(model)]


def assert_same_state(saved, model, but_statistics=False):
    """The model's variables are bit for bit as `saved` (but moving statistics, after a recalibrate)."""
    now = probes.state_of(model)
    assert [id(variable) for variable, _ in saved] == [id(variable) for variable in now]
    for variable, value in saved:
        if but_statistics and variable.name in ("moving_mean", "moving_variance"):
            continue
        assert np.array_equal(keras.ops.convert_to_numpy(variable.value), value), variable.path


def relative(expected, actual):
    return float(np.max(np.abs(expected - actual)) / max(1e-6, float(np.max(np.abs(expected)))))


def data_for(model, seed, count=12):
    return np.random.default_rng(seed).normal(size=(count, *model.inputs[0].shape[1:])).astype("float32")


@pytest.mark.filterwarnings("ignore::bnseq.BatchNormPlacementWarning")
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")  # Keras seeds from `random`
@given(drawn_models())
def test_fuzz_every_result_against_its_oracle(case):
    drawn, model = case
    randomized(model, 0)
    x = data_for(model, 1)
    # Like with like: a backend bug both models meet alike (probes.bias_add_is_sound) is not bnseq's.
    expected, eager = probes.predicted(model, x), probes.infer(model, x)
    source = state(model)  # reading changes nothing: checked after every call below

    # axis="auto": the generator's axis, or a refusal where it has none.
    for axis, settled in drawn.auto:
        assert settled == axis, (axis, settled, describe(model))

    # lint: exactly what was planted.
    found = bnseq.lint(model)
    findings = {(f.code, f.layer) for f in found}
    assert findings == drawn.expected, (findings ^ drawn.expected, [str(f) for f in found], describe(model))
    assert_same_state(source, model)

    # fold: the same outputs, as predict runs the folded model and eagerly, or kept with a reason.
    folded, report = bnseq.fold_with_report(model)
    assert relative(expected, probes.predicted(folded, x)) <= 1e-4
    assert relative(eager, probes.infer(folded, x)) <= 1e-4
    assert all(decision.folded or decision.reason for decision in report), [str(d) for d in report]
    assert_same_state(source, model)

    # reparameterize, then fold: the same outputs, every sum merged or kept with a reason.
    merged, sums = bnseq.reparameterize_with_report(model)
    assert all(decision.merged or decision.reason for decision in sums), [str(d) for d in sums]
    assert relative(expected, probes.predicted(merged, x)) <= 1e-4
    assert relative(expected, probes.predicted(bnseq.fold(merged), x)) <= 1e-4
    assert_same_state(source, model)

    # batch_normalize(data=): the same outputs, or its documented refusal.
    try:
        fixed = bnseq.batch_normalize(model, drawn.options, data=x, batch_size=5)
    except ValueError as error:
        assert str(error).startswith("batch_normalize(data=...) cannot keep the predictions"), error
    else:
        assert relative(expected, probes.predicted(fixed, x)) <= 1e-4
        # No wasted bias, nothing new; what it cannot move (after a merge, after another BN) it leaves.
        # One exception: a BN after a linear layer whose output is also read elsewhere cannot become
        # that layer's own, which gets a new one: the user's then directly follows it (BN004).
        after = {(f.code, f.layer) for f in bnseq.lint(fixed)}
        new = after - findings
        graph = walk(model)
        behind_shared_linear = {
            layer.name for layer in graph.layers
            if isinstance(layer, layers.BatchNormalization) and kinds.is_linear(graph.sole_producer(layer))
        }
        assert not any(code == "BN001" for code, _ in after), after
        assert all(code == "BN004" and name in behind_shared_linear for code, name in new), (new, describe(fixed))

    assert_same_state(source, model)

    # recalibrate: exact statistics by an independent capture, and a second call changes nothing.
    report = bnseq.recalibrate(model, x, batch_size=5, verbose=0)
    assert_same_state(source, model, but_statistics=True)
    errors = statistics_errors(model, x)
    assert all(error <= 1e-4 for error in errors.values()), (errors, describe(model))
    again = bnseq.recalibrate(model, x, batch_size=7, verbose=0)
    assert all(row.mean_change <= 1e-4 and row.variance_change <= 1e-3 for row in again), again
    assert len(report) == len(again)


# Masked sequences: Embedding(mask_zero=True), then random Dense / BN / activation steps ---------------


@st.composite
def masked_models(draw):
    inputs = keras.Input((7,), dtype="int32")
    x = layers.Embedding(12, 4, mask_zero=True)(inputs)
    for step in draw(st.lists(st.sampled_from(["dense", "bn", "act", "dropout"]), min_size=2, max_size=6)):
        if step == "dense":
            x = layers.Dense(draw(st.integers(2, 5)), use_bias=draw(st.booleans()),
                             activation=draw(st.sampled_from(ACTIVATIONS)))(x)
        elif step == "bn":
            x = layers.BatchNormalization()(x)
        elif step == "act":
            x = layers.ReLU()(x)
        else:
            x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, layers.BatchNormalization()(x))


def masked_statistics_errors(model, x):
    """Each BatchNormalization's moving statistics against its inputs' masked moments, captured in one call."""
    seen = {}
    wrapped = [layer for layer in model._flatten_layers() if isinstance(layer, layers.BatchNormalization)]
    for layer in wrapped:
        seen[id(layer)] = []

        def recording(inputs, *args, _layer=layer, _call=layer.call, **kwargs):
            mask = kwargs.get("mask")
            seen[id(_layer)].append((keras.ops.convert_to_numpy(inputs).astype(np.float64),
                                     None if mask is None else keras.ops.convert_to_numpy(mask)))
            return _call(inputs, *args, **kwargs)

        layer.call = recording
    try:
        model(x, training=False)
    finally:
        for layer in wrapped:
            del layer.call
    errors = {}
    for layer in wrapped:
        values = np.concatenate([inputs[mask.astype(bool)] for inputs, mask in seen[id(layer)]])
        mean, variance = values.mean(axis=0), values.var(axis=0)
        errors[layer.name] = max(
            float(np.abs(keras.ops.convert_to_numpy(layer.moving_mean) - mean).max()),
            float(np.abs(keras.ops.convert_to_numpy(layer.moving_variance) - variance).max()),
        ) / max(1.0, float(np.abs(mean).max()), float(variance.max()))
    return errors


@pytest.mark.filterwarnings("ignore::bnseq.BatchNormPlacementWarning")
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@given(masked_models(), st.integers(1, 6))
def test_fuzz_masked_sequences(model, padded):
    randomized(model, 2)
    x = np.random.default_rng(3).integers(1, 12, size=(16, 7))
    x[:, 7 - padded:] = 0  # padding, masked out
    x[::4, 1:] = 0
    expected = probes.predicted(model, x)
    bnseq.recalibrate(model, x, batch_size=5, verbose=0)
    errors = masked_statistics_errors(model, x)
    assert all(error <= 1e-4 for error in errors.values()), (errors, describe(model))
    expected = probes.predicted(model, x)
    assert relative(expected, probes.predicted(bnseq.fold(model), x)) <= 1e-4


# Stateful recurrent layers and non-finite samples (issue 29) -------------------------------------------


@st.composite
def recurrent_models(draw):
    """A stateful LSTM, GRU or SimpleRNN (or a Bidirectional one) before Dense and BatchNormalization steps."""
    kind = draw(st.sampled_from([layers.LSTM, layers.GRU, layers.SimpleRNN]))
    recurrent = kind(draw(st.integers(2, 4)), stateful=True, return_sequences=draw(st.booleans()))
    if draw(st.booleans()):
        recurrent = layers.Bidirectional(recurrent)
    inputs = keras.Input(batch_shape=(4, 5, 3))
    x = recurrent(inputs)
    for step in draw(st.lists(st.sampled_from(["dense", "bn", "act"]), min_size=1, max_size=4)):
        if step == "dense":
            x = layers.Dense(draw(st.integers(2, 4)), use_bias=draw(st.booleans()))(x)
        elif step == "bn":
            x = layers.BatchNormalization()(x)
        else:
            x = layers.ReLU()(x)
    return keras.Model(inputs, layers.BatchNormalization()(x))


@pytest.mark.filterwarnings("ignore::bnseq.BatchNormPlacementWarning")
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@given(recurrent_models(), st.integers(0, 2 ** 31 - 1))
def test_fuzz_stateful_recurrent_state_is_left_where_it_was(model, seed):
    """lint, fold, batch_normalize and recalibrate leave the carried states (and every other variable) as they were."""
    rng = np.random.default_rng(seed)
    randomized(model, seed)
    model(rng.standard_normal((4, 5, 3)).astype("float32"))  # carried states set, eagerly
    source = state(model)
    assert any(np.any(value) for variable, value in source if variable.name == "rnn_state")
    x = rng.standard_normal((12, 5, 3)).astype("float32")
    bnseq.lint(model)
    bnseq.fold(model)
    assert_same_state(source, model)
    bnseq.recalibrate(model, x, batch_size=4, verbose=0)
    assert_same_state(source, model, but_statistics=True)


@pytest.mark.filterwarnings("ignore::bnseq.BatchNormPlacementWarning")
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@given(drawn_models(), st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 10 ** 6))
def test_fuzz_a_non_finite_sample_is_never_a_zero_difference(case, bad, where):
    """export refuses a sample holding NaN or infinity, naming the input; a difference with one is infinite."""
    _, model = case
    x = data_for(model, 4, count=3)
    flat = x.reshape(-1)
    flat[where % flat.size] = bad
    with pytest.raises(ValueError, match=r"holds NaN or infinity \(in 1 of 3 examples"):
        bnseq.export(model, os.path.join(tempfile.mkdtemp(), "m.keras"), sample=x, safe_mode=False)
    outputs = probes.predicted(model, data_for(model, 5, count=3))
    assert probes.largest_difference([outputs], [np.where(np.arange(outputs.size).reshape(outputs.shape) == 0,
                                                          bad, outputs)]) == (np.inf, np.inf)


# Issue 33's classes: dict inputs, mixed precision, unknown channels_first sizes -------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras warns when a dict's keys are not the input names
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@given(st.permutations(["zeta", "alpha", "mid"]), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_fuzz_dict_inputs_are_matched_by_name(names, by_name, seed):
    """Keys and input names in different orders: recalibrate and batch_normalize(data=) pair them by name."""
    rng = np.random.default_rng(seed)
    keys = ["k_b", "k_c", "k_a"]  # the model's keys, none sorted like the names
    tensors = {key: keras.Input((3,), name=name) for key, name in zip(keys, names)}
    branches = [layers.Dense(2, use_bias=False)(tensors[key]) for key in keys]
    merged = layers.Concatenate()(branches)
    model = keras.Model(tensors, layers.BatchNormalization(name="bn")(merged))
    shifts = {key: 10.0 * index for index, key in enumerate(keys)}
    arrays = {key: rng.normal(shifts[key], 1.0, (12, 3)).astype("float32") for key in keys}
    data = {tensors[key].name: arrays[key] for key in keys} if by_name else arrays
    bnseq.recalibrate(model, data, batch_size=4, verbose=0)
    mean = keras.ops.convert_to_numpy(model.get_layer("bn").moving_mean)
    for index, key in enumerate(keys):
        kernel = keras.ops.convert_to_numpy(branches[index]._keras_history.operation.kernel)
        np.testing.assert_allclose(mean[2 * index : 2 * index + 2], (arrays[key] @ kernel).mean(axis=0),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::bnseq.BatchNormPlacementWarning")
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@given(st.lists(st.sampled_from(["dense", "bn", "act"]), min_size=1, max_size=4), st.integers(0, 2 ** 31 - 1))
def test_fuzz_mixed_precision_keeps_a_float32_softmax_float32(steps, seed):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((4,))
        x = inputs
        for step in steps:
            x = {"dense": lambda t: layers.Dense(3, use_bias=False)(t), "bn": layers.BatchNormalization(),
                 "act": layers.ReLU()}[step](x)
        x = layers.BatchNormalization()(layers.Dense(3, use_bias=False)(x))
        model = keras.Model(inputs, layers.Activation("softmax", dtype="float32")(x))
    finally:
        keras.config.set_dtype_policy(previous)
    randomized(model, seed % 1000)
    folded = bnseq.fold(model)
    x = np.random.default_rng(seed).standard_normal((6, 4)).astype("float32")
    outputs = probes.predicted(folded, x)
    assert outputs.dtype == np.float32
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, rtol=1e-5)
    assert relative(probes.predicted(model, x), outputs) <= 3e-2  # bfloat16 compute on both sides


@pytest.mark.filterwarnings("ignore::bnseq.BatchNormPlacementWarning")
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@given(st.sampled_from(["conv", "transpose", "depthwise"]), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_fuzz_channels_first_with_unknown_spatial_sizes(kind, forward, seed):
    """Input((C, None, None)): fold is exact under predict and eagerly, also where the width equals C."""
    channels = 4
    make = {
        "conv": lambda: layers.Conv2D(channels, 3, padding="same", use_bias=False, data_format="channels_first"),
        "transpose": lambda: layers.Conv2DTranspose(channels, 3, padding="same", use_bias=False,
                                                    data_format="channels_first"),
        "depthwise": lambda: layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                                                    data_format="channels_first"),
    }[kind]
    inputs = keras.Input((channels, None, None))
    if forward:  # a BatchNormalization after an activation folds forward into the convolution after it
        x = layers.BatchNormalization(axis=1)(layers.ReLU()(make()(inputs)))
        x = layers.Conv2D(channels, 1, use_bias=False, data_format="channels_first")(x)
    else:
        x = layers.BatchNormalization(axis=1)(make()(inputs))
    model = keras.Model(inputs, x)
    randomized(model, seed % 1000)
    folded = bnseq.fold(model)
    x = np.random.default_rng(seed).standard_normal((2, channels, 5, channels)).astype("float32")
    for run in (probes.predicted, probes.infer):
        assert relative(run(model, x), run(folded, x)) <= 1e-4
