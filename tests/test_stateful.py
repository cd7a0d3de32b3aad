"""A stateful property test: any sequence of what users do to a bnseq.Sequential.

Hypothesis drives add (random linear kind, activation, options) / pop / a
`.keras` round trip / deepcopy, and on the side `clone_model`, `fold` and
`batch_normalize`; after every step the model must have the layers of the
units added so far, compute what the same layers written by hand in plain
Keras compute (weights copied), and lint clean. channels_last only: the data
formats are covered by test_properties, and here every step would compile
channels_first models through XLA on CPUs without oneDNN.
"""

import copy
import os
import tempfile

import keras
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import initialize
from hypothesis.stateful import invariant
from hypothesis.stateful import precondition
from hypothesis.stateful import rule

import bnseq
from bnseq.probes import infer
from tests.strategies import ACTIVATIONS
from tests.strategies import KINDS
from tests.strategies import Spec
from tests.strategies import build_by_hand


def specs_for(rank):
    return st.builds(
        Spec,
        kind=st.sampled_from(KINDS[rank] + [keras.layers.Dense]),
        units=st.integers(1, 3),
        data_format=st.just("channels_last"),
        activation=st.sampled_from(sorted(ACTIVATIONS)),
        use_bias=st.booleans(),
        batch_norm=st.sampled_from([None, None, False, True, {"momentum": 0.9}]),
    )


class SequentialUse(RuleBasedStateMachine):
    @initialize(rank=st.sampled_from([1, 2]), model_batch_norm=st.sampled_from([True, False, {"epsilon": 1e-4}]))
    def start(self, rank, model_batch_norm):
        self.rank, self.model_batch_norm = rank, model_batch_norm
        self.shape = (3,) * (rank + 1)
        self.model = bnseq.Sequential([keras.Input(self.shape)], batch_norm=model_batch_norm)
        self.specs = []
        self.x = np.random.default_rng(len(self.shape)).normal(size=(2, *self.shape)).astype("float32")

    @rule(data=st.data())
    def add(self, data):
        spec = data.draw(specs_for(self.rank))
        self.model.add(spec.make(), batch_norm=spec.batch_norm)
        self.specs.append(spec)

    @precondition(lambda self: self.specs)
    @rule()
    def pop(self):
        self.model.pop()
        self.specs.pop()

    # An empty model (only its Input) does not survive saving, in Keras either:
    # loaded, it fails on its first call (Keras 3.15, keras.Sequential too).
    @precondition(lambda self: self.specs)
    @rule()
    def keras_file_round_trip(self):
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "model.keras")
            self.model.save(path)
            restored = keras.saving.load_model(path)
        assert type(restored) is bnseq.Sequential
        np.testing.assert_allclose(infer(restored, self.x), infer(self.model, self.x), rtol=1e-6, atol=1e-6)
        self.model = restored

    @precondition(lambda self: self.specs)
    @rule()
    def deepcopy(self):
        self.model = copy.deepcopy(self.model)

    @precondition(lambda self: self.specs)
    @rule()
    def clone_model(self):
        clone = keras.models.clone_model(self.model)
        assert [type(layer) for layer in clone.layers] == [type(layer) for layer in self.model.layers]
        clone.set_weights(self.model.get_weights())
        np.testing.assert_allclose(infer(clone, self.x), infer(self.model, self.x), rtol=1e-6, atol=1e-6)

    @precondition(lambda self: self.specs)
    @rule()
    def fold(self):
        folded = bnseq.fold(self.model)
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
        expected, actual = infer(self.model, self.x), infer(folded, self.x)
        assert np.max(np.abs(expected - actual)) <= 1e-4 * max(1.0, float(np.max(np.abs(expected))))

    @rule()
    def batch_normalize(self):
        fixed = bnseq.batch_normalize(self.model)
        assert bnseq.lint(fixed) == []
        assert [type(layer) for layer in bnseq.batch_normalize(fixed).layers] == [type(layer) for layer in fixed.layers]

    @invariant()
    def is_the_hand_written_model(self):
        if not hasattr(self, "model"):
            return
        by_hand = build_by_hand(self.shape, self.specs, self.model_batch_norm)
        assert [type(layer) for layer in self.model.layers] == [type(layer) for layer in by_hand.layers]
        if self.specs:
            by_hand.set_weights(self.model.get_weights())
            np.testing.assert_allclose(infer(self.model, self.x), infer(by_hand, self.x), rtol=1e-6, atol=1e-6)
        assert bnseq.lint(self.model) == []


SequentialUse.TestCase.settings = settings(max_examples=20, stateful_step_count=8, deadline=None)
test_sequential_use = SequentialUse.TestCase
