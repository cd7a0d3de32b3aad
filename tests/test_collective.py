"""collective.py without processes: the exchange against a scripted peer, the pooled rows, the
refusal of a JAX variable no process holds whole. tests/test_distributed.py runs real processes."""

import re

import numpy as np
import pytest

from bnseq.statistics import collective
from bnseq.statistics import compiled
from bnseq.statistics import segments


class _Peer(collective.Processes):
    """Rank 0 of two, the other process scripted: `peer(words)` gives its words for each gather."""

    def __init__(self, peer):
        super().__init__(2, 0, "scripted")
        self.peer = peer

    def _gather_words(self, words):
        return np.stack([words, self.peer(words)])


def test_exchange_merges_rows_and_reports_the_other_process():
    vector = np.array([1.0, 2.5, -3.0])
    rows = _Peer(lambda words: words)._gather(vector)
    np.testing.assert_array_equal(rows, [vector, vector])  # float64 through 32-bit words, exactly
    failed = _Peer(lambda words: np.zeros_like(words))  # the peer's status says it failed
    with pytest.raises(collective.ProcessFailure, match=re.escape(
        "recalibrate failed on process 1 of 2 (scripted); this process (rank 0) stopped with its statistics "
        "as they were. The error is in process 1's output."
    )):
        failed.exchange(vector)
    with pytest.raises(KeyError, match="mine"):  # this process's own failure is raised here, after telling
        failed.exchange(vector, KeyError("mine"))

    def longer(words):  # status: succeeded, but sends 4 values
        status = np.array([1.0, 4.0]).view(np.int32)
        return status if len(words) == len(status) else words
    with pytest.raises(ValueError, match=re.escape(
        "The processes of this scripted run hold different models: they would exchange [3, 4] values. "
        "Every process must recalibrate the same model. Received on rank 0: 3 values"
    )):
        _Peer(longer).exchange(vector)


def test_pooled_rows_equal_the_statistics_of_all_the_data():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (5, 3)), rng.normal(4, 2, (9, 3))
    rows = []
    for part in (a, b, np.zeros((0, 3))):  # a process whose data never reached the layer counts 0
        pooled = segments.Pooled()
        if len(part):
            pooled.merge(len(part), part.mean(axis=0), ((part - part.mean(axis=0)) ** 2).sum(axis=0))
        rows.append(collective.pack([pooled], [3]))
    (merged,) = collective.merge_rows(np.stack(rows), segments.Pooled, [3])
    both = np.concatenate([a, b])
    assert merged.count == 14
    np.testing.assert_allclose(merged.mean, both.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged.variance, both.var(axis=0), rtol=1e-12)


def test_a_jax_variable_sharded_across_processes_is_refused():
    class Value:  # what a ModelParallel layout gives: this process holds part of it
        is_fully_addressable, is_fully_replicated = False, False
        sharding, shape = "NamedSharding(mesh, P('model'))", (4, 8)

    class Variable:
        path, value = "dense/kernel", Value()

    with pytest.raises(ValueError, match=re.escape(
        "Variable 'dense/kernel' is sharded across processes (NamedSharding(mesh, P('model'))), so no "
        "process holds all of it, and bnseq computes each process's statistics on that process alone. "
        "Recalibrate under a distribution that replicates the variables "
        "(keras.distribution.DataParallel). Received: a variable of shape (4, 8)"
    )):
        compiled._local(Variable())


def test_the_signature_reads_the_layers_not_their_names():
    import keras

    def layers(*sizes, prefix):
        made = [keras.layers.BatchNormalization(name=f"{prefix}_{i}") for i in range(len(sizes))]
        for layer, size in zip(made, sizes):
            layer.build((None, size))
        return made

    same = collective.signature(layers(3, 4, prefix="a"))
    np.testing.assert_array_equal(same, collective.signature(layers(3, 4, prefix="b")))
    assert not np.array_equal(same, collective.signature(layers(3, 5, prefix="a")))
    assert not np.array_equal(same, collective.signature(layers(3, prefix="a")))


def _model():
    import keras

    import bnseq

    return bnseq.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)], batch_norm=True
    )


def test_recalibrate_with_a_peer_holding_the_same_data(monkeypatch):
    """A scripted second process that sends back what this one sends: twice the samples, the same statistics."""
    import bnseq

    x = np.random.default_rng(0).normal(1.0, 2.0, size=(40, 3)).astype("float32")
    alone, pooled = _model(), _model()
    pooled.set_weights(alone.get_weights())
    expected = bnseq.recalibrate(alone, x, batch_size=16, verbose=0)
    monkeypatch.setattr(collective, "processes_of", lambda model: _Peer(lambda words: words))
    report = bnseq.recalibrate(pooled, x, batch_size=16, verbose=0)
    assert report.processes == 2 and "statistics pooled over 2 processes" in str(report)
    assert [row.samples for row in report] == [2 * row.samples for row in expected] == [80, 80]
    for mine, theirs in zip(pooled.get_weights(), alone.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)


def test_recalibrate_refuses_a_peer_with_another_model_and_changes_nothing(monkeypatch):
    import bnseq

    model = _model()
    before = model.get_weights()
    rounds = []

    def other_model(words):  # the status round agrees; the signature round does not
        rounds.append(len(words))
        return words if len(rounds) == 1 else words + 1

    monkeypatch.setattr(collective, "processes_of", lambda model: _Peer(other_model))
    with pytest.raises(ValueError, match=re.escape(
        "The processes of this scripted run hold different models (their BatchNormalization layers differ in "
        "number or sizes). Every process must recalibrate the same model."
    )):
        bnseq.recalibrate(model, np.ones((8, 3), "float32"), verbose=0)
    for now, then in zip(model.get_weights(), before):
        np.testing.assert_array_equal(now, then)
