"""bnseq.segments: levels, the calls of each step, the tensors each cut keeps, the plan cache."""

import gc
import weakref

import keras
import numpy as np
from keras import layers

import bnseq
from bnseq.reading import graph
from bnseq.statistics import plans
from bnseq.statistics import segments


def batch_norms(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, layers.BatchNormalization)]


def residual():
    inputs = keras.Input((4,), name="x")
    a = layers.BatchNormalization(name="a")(layers.Dense(4, use_bias=False, name="da")(inputs))
    b = layers.BatchNormalization(name="b")(layers.Dense(4, use_bias=False, name="db")(layers.ReLU(name="r")(a)))
    short = layers.BatchNormalization(name="short")(layers.Dense(4, use_bias=False, name="ds")(inputs))
    merged = layers.Concatenate(name="cat")([layers.Add(name="add")([b, short]), inputs])
    c = layers.BatchNormalization(name="c")(layers.Dense(2, use_bias=False, name="dc")(merged))
    return keras.Model(inputs, layers.Dense(1, name="head")(c))


def levels_of(plan):
    return {level: sorted(layer.name for layer in layers_) for level, layers_ in plan.by_level.items()}


def test_levels_of_a_residual_graph():
    model = residual()
    plan = plans.plan_for(model, graph.flatten(model), batch_norms(model), chained=True)
    assert plan.levels == 3
    assert levels_of(plan) == {1: ["a", "short"], 2: ["b"], 3: ["c"]}


def test_without_chaining_every_layer_is_measured_at_once():
    model = residual()
    plan = plans.plan_for(model, graph.flatten(model), batch_norms(model), chained=False)
    assert levels_of(plan) == {1: ["a", "b", "c", "short"]}


def test_each_call_runs_once_and_the_head_never():
    model = residual()
    plan = plans.plan_for(model, graph.flatten(model), batch_norms(model), chained=True)
    names = [call.operation.name for call in plan.flat.calls if id(call) in plan.call_step]
    assert "head" not in names and "c" not in names  # nothing after the last BatchNormalization's input
    steps, start = [], -1
    for stop in range(plan.levels):
        step = plans.step_calls(plan, start, stop, store=stop + 1 < plan.levels)
        steps.append([call.operation.name for call in step.calls])
        start = stop
    # A call runs in the step of its level: `short` (level 1) with `a`, before the add that needs `b`.
    assert steps == [["da", "ds"], ["a", "r", "db", "short"], ["b", "add", "cat", "dc"]]
    assert sum(len(each) for each in steps) == plan.needed


def test_a_cut_keeps_what_later_steps_read_and_the_input_for_the_skip():
    model = residual()
    plan = plans.plan_for(model, graph.flatten(model), batch_norms(model), chained=True)
    after_first = plans.cut(plan, 0)
    producers = {ref: call.operation.name for call in plan.flat.calls for ref in call.outputs}
    assert sorted(producers.get(ref, "input") for ref in after_first) == ["da", "ds", "input"]
    after_second = plans.cut(plan, 1)
    assert sorted(producers.get(ref, "input") for ref in after_second) == ["db", "input", "short"]


def test_the_plan_is_kept_without_keeping_the_model_alive():
    model = residual()
    bnseq.recalibrate(model, np.ones((4, 4), "float32"), verbose=0)
    assert model in plans._PLANS
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_pooled_merges_batches_exactly():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 2.0, size=(size, 2)) for size in (7, 1, 12)]
    pooled = segments.Pooled()
    for part in parts:
        pooled.merge(len(part), part.mean(axis=0), ((part - part.mean(axis=0)) ** 2).sum(axis=0))
    everything = np.concatenate(parts)
    np.testing.assert_allclose(pooled.mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled.variance, everything.var(axis=0), rtol=1e-12)
    assert pooled.count == 20
