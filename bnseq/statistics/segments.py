"""Exact statistics of BatchNormalization inputs, the model computed segment by segment.

A BatchNormalization's input in inference depends on the final statistics of
every BatchNormalization before it, so exact statistics come level by level:
level 1 holds the layers with no BatchNormalization upstream, level 2 those
with only level 1 upstream, and so on (a residual network has one level per
BatchNormalization on its main path: 49 of ResNet50's 53). Measuring level
`k + 1` needs every batch through everything up to level `k`.

Instead of running the model again from its inputs for each level, the
flattened model (`graph.flatten`) is cut into segments, one per level: step
`k` computes, batch by batch, the calls that only need statistics up to level
`k`, the per-channel moments of the level `k + 1` inputs (in the compiled
function, in float32 or wider), and keeps the tensors later steps read (the
cut). Each call then runs once: the whole job costs one forward pass, plus
one compile per step. When a cut would not fit in `cache_limit`, it is not
kept, and the next step computes again from the last cut that was kept (from
the data itself at worst), so memory stays bounded and the work grows
instead; `Measurement.passes` says how much work it was.

Here are the decisions, on plain values: levels, which calls each step
makes, which tensors cross each cut, whether a cut fits. `compiled.py` turns
a step into a function compiled as `predict` is (a `tf.function` on
TensorFlow, by XLA where channels_first layers need it, `jax.jit` of a
stateless call on JAX, eager without gradients on PyTorch). The plan and its
compiled steps are kept for the model (weakly), so that a second call on the
same model compiles nothing.
"""

import collections
import dataclasses
import os
import weakref

import keras
import numpy as np

from bnseq import internals
from bnseq import probes
from bnseq.reading import graph as graph_module
from bnseq.statistics import collective
from bnseq.statistics import compiled
from bnseq.statistics import data

DEFAULT_CACHE_FRACTION = 0.5  # of the memory available when the call starts, for "auto"


@dataclasses.dataclass
class Measurement:
    """What `measure` found and what it cost.

    Attributes:
        stats: dict. `id(layer)` -> `Pooled`, for each BatchNormalization.
        passes: float. Layer calls made, over the calls one forward pass
            makes (1.0 when every cut was kept).
        cache_peak: int. The most bytes of activations kept at once.
        ran: list. The BatchNormalization layers hidden in untraced layers,
            in the order a real call ran them (empty when there are none).
    """

    stats: dict
    passes: float
    cache_peak: int
    ran: list = dataclasses.field(default_factory=list)


class Pooled:
    """Per-channel count, mean and sum of squared deviations, pooled in float64.

    Batches are merged with Chan et al.'s pairwise update, exact for batches
    of any size.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def merge(self, count, mean, m2):
        count = int(count)
        if count == 0:
            return
        mean = np.asarray(mean, np.float64)
        m2 = np.asarray(m2, np.float64)
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    @property
    def variance(self):
        """The biased variance, as Keras's batch statistics."""
        return self.m2 / self.count

    def assign_to(self, layer):
        """Set `layer`'s moving mean and variance to these (left as they are with no samples)."""
        if self.count:
            layer.moving_mean.assign(self.mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(self.variance.astype(layer.moving_variance.dtype))


def measure(
    model,
    batches,
    batch_norms,
    *,
    flat=None,
    chained=True,
    on_level=None,
    cache_limit="auto",
    progress=None,
    processes=None,
):
    """Pool the inputs of `batch_norms` over `batches`, everything else in inference mode.

    Args:
        model: `keras.Model`, built.
        batches: list. Batches of the model's input, as `model(x)` takes.
        batch_norms: list of BatchNormalization layers to measure, visible in
            the model's graph or hidden in subclassed layers.
        flat: `graph.Flat`, optional. The model already flattened.
        chained: bool. `True` when a layer's statistics change what comes
            after it, so levels are measured in turn and `on_level` sets each
            level's statistics before the next is measured; `False` when they
            do not (all are measured in one step).
        on_level: callable, optional. `on_level(layers, stats)` after each
            level.
        cache_limit: int or `"auto"`. Bytes of activations that may be kept
            between steps; `"auto"` is half the memory available now.
        progress: `keras.utils.Progbar`, optional, advanced once per batch
            and step. Its target is set here.
        processes: `collective.Processes`, optional. The processes that
            each measure their own `batches`: after each level, the
            statistics are pooled over all of them (and a failure in any
            one makes all raise).

    Returns:
        `Measurement`.

    Raises:
        ValueError: if a BatchNormalization takes its own output (through
            other layers) as input, which no statistics can be exact for.
    """
    with collective.failures_shared(processes):
        limit = _cache_limit(cache_limit)
        flat = flat or graph_module.flatten(model)
        if _has_masks(flat):
            # A Keras mask travels on its tensor, and a kept cut loses it: every step then computes
            # from the model's inputs (about levels / 2 passes), so that masks reach what reads them.
            limit = 0
        order = _run_order(model, flat, batches, batch_norms)
        plan = _plan_for(model, flat, batch_norms, chained, order)
        values = [data.model_inputs(model, x, flat) for x in batches]
    if processes is not None:  # every process made the same plan, or all stop here
        rows = processes.exchange(collective.signature(batch_norms))
        if any(not np.array_equal(row, rows[processes.rank]) for row in rows):
            raise ValueError(
                f"The processes of this {processes.kind} run hold different models (their BatchNormalization "
                "layers differ in number or sizes). Every process must recalibrate the same model."
            )
    stats = {id(layer): Pooled() for layer in batch_norms}
    levels = [level for level in range(1, plan.levels + 1) if plan.targets.get(level) or plan.probes.get(level)]
    if progress is not None:
        progress.target = len(levels) * len(batches)
    with compiled.Capturing(plan.hidden) as capture:
        run = _Run(plan, capture, stats, limit, len(batches))
        run.work += plan.needed if order is not None else 0  # the call that showed the order
        run.start(values)
        for level in levels:  # a level with nothing to measure is computed with the next one
            layers = plan.by_level.get(level, [])
            with collective.failures_shared(processes):
                run.step(level - 1, progress)
            if processes is not None:
                _pool(processes, layers, stats)
            if on_level is not None:
                on_level(layers, stats)
    return Measurement(stats=stats, passes=run.passes(), cache_peak=run.peak, ran=order or [])


def _pool(processes, layers, stats):
    """Each layer's statistics pooled over all processes, each having measured its own data."""
    sizes = [int(np.prod(layer.moving_mean.shape)) for layer in layers]
    rows = processes.exchange(collective.pack([stats[id(layer)] for layer in layers], sizes))
    for layer, pooled in zip(layers, collective.merge_rows(rows, Pooled, sizes)):
        stats[id(layer)] = pooled


def _has_masks(flat):
    """Whether a tensor of the flattened model carries a Keras mask."""
    for call in flat.calls:
        for ref in call.outputs:
            spec = ref.spec
            if spec is None:  # a layer of a Sequential model: Keras's own record of its call
                try:
                    spec = call.operation.output
                except (AttributeError, ValueError):
                    spec = None
            if any(internals.carries_mask(each) for each in keras.tree.flatten(spec) if each is not None):
                return True
    return False


def _run_order(model, flat, batches, batch_norms):
    """The BatchNormalization layers hidden in untraced layers, in the order a real call runs them.

    Such a layer's `call()` is unknown code: the order in which it runs the
    BatchNormalization layers it holds is seen by running it, once, on the
    first batch in inference (a layer never run there is left out, and
    keeps its statistics). `None` when no measured layer is hidden.
    """
    wanted = {id(layer) for layer in batch_norms}
    hidden = [
        layer for call in flat.calls for layer in graph_module.hidden_batch_norms(call.operation) if id(layer) in wanted
    ]
    if not hidden:
        return None
    with compiled.Capturing(hidden) as capture:
        capture.order = []
        probes.infer(model, batches[0])
    return capture.order


# Levels and steps -------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Plan:
    """The flattened model, its levels, and the compiled steps made so far."""

    flat: graph_module.Flat
    levels: int
    by_level: dict  # level -> the layers measured at that level
    made: dict  # Ref -> the step that computes it (-1 for model inputs)
    call_step: dict  # id(Call) -> its step
    last_use: dict  # Ref -> the last step that reads it
    targets: dict  # level -> [(layer, Ref of its input)] visible BatchNormalization calls
    probes: dict  # level -> [(Call, [hidden layers])] subclassed calls to run with capture
    hidden: list  # every hidden layer measured
    needed: int  # calls one forward pass of the needed part makes (subclassed layers probed included)
    jit_compile: bool
    functions: dict = dataclasses.field(default_factory=dict)


_PLANS = weakref.WeakKeyDictionary()  # model -> {key: _Plan}; a plan holds no reference to its model


def _plan_for(model, flat, batch_norms, chained, order=None):
    jit_compile = probes.needs_xla(model)
    key = (
        tuple((id(call.operation), len(call.inputs), len(call.outputs)) for call in flat.calls),
        tuple(id(layer) for layer in batch_norms),
        chained,
        jit_compile,
        tuple(id(layer) for layer in order or ()),
    )
    opaque = any(call.operation is model for call in flat.calls)  # a subclassed model: its own leaf
    plans = None if opaque else _PLANS.setdefault(model, {})
    if plans is not None and key in plans:
        return plans[key]
    plan = _make_plan(flat, batch_norms, chained, jit_compile, order)
    if plans is not None:
        plans.clear()  # one plan per model: an old one is for a model that has changed since
        plans[key] = plan
    return plan


def _make_plan(flat, batch_norms, chained, jit_compile, order=None):
    # A cached plan must not keep its model alive: its calls forget their parents.
    flat = dataclasses.replace(flat, calls=[dataclasses.replace(call, parent=None) for call in flat.calls])
    wanted = {id(layer) for layer in batch_norms}
    position = {id(layer): index for index, layer in enumerate(order or ())}
    hidden_in = {}  # id(Call) -> the measured layers hidden inside its operation, in the order they run
    for call in flat.calls:
        inner = [each for each in graph_module.hidden_batch_norms(call.operation) if id(each) in wanted]
        if order is not None:
            inner = sorted((each for each in inner if id(each) in position), key=lambda each: position[id(each)])
        if inner:
            hidden_in[id(call)] = inner
    level_of_layer, call_level = _levels(flat, wanted, hidden_in, chained)
    levels = max(level_of_layer.values(), default=0)
    targets, probes_at = collections.defaultdict(list), collections.defaultdict(list)
    by_level = collections.defaultdict(list)
    for layer in batch_norms:
        if id(layer) in level_of_layer:
            by_level[level_of_layer[id(layer)]].append(layer)
    for call in flat.calls:
        if id(call.operation) in wanted:
            targets[level_of_layer[id(call.operation)]].append((call.operation, _first_ref(call)))
        for layer in hidden_in.get(id(call), ()):
            group = probes_at[level_of_layer[id(layer)]]
            if not group or group[-1][0] is not call:
                group.append((call, []))
            group[-1][1].append(layer)

    # The needed calls: what the measured inputs depend on, nothing after them.
    needed, refs = [], set()
    for level in range(1, levels + 1):
        refs.update(ref for _, ref in targets[level])
        refs.update(ref for call, _ in probes_at[level] for ref in call.inputs)
    for call in reversed(flat.calls):
        if any(ref in refs for ref in call.outputs):
            needed.append(call)
            refs.update(call.inputs)
    needed.reverse()

    made = {ref: -1 for ref in flat.inputs}
    call_step = {}
    last_use = collections.defaultdict(lambda: -1)
    for call in needed:
        step = call_level[id(call)]
        call_step[id(call)] = step
        for ref in call.outputs:
            made[ref] = step
        for ref in call.inputs:
            last_use[ref] = max(last_use[ref], step)
    for level in range(1, levels + 1):  # measured in the step before their level
        for _, ref in targets[level]:
            last_use[ref] = max(last_use[ref], level - 1)
        for call, _ in probes_at[level]:
            for ref in call.inputs:
                last_use[ref] = max(last_use[ref], level - 1)
    return _Plan(
        flat=flat,
        levels=levels,
        by_level=dict(by_level),
        made=made,
        call_step=call_step,
        last_use=dict(last_use),
        targets=dict(targets),
        probes=dict(probes_at),
        hidden=[layer for layers in hidden_in.values() for layer in layers],
        needed=len({id(call) for call in needed} | {id(call) for calls in probes_at.values() for call, _ in calls}),
        jit_compile=jit_compile,
    )


def _levels(flat, wanted, hidden_in, chained):
    """Levels of the measured layers and of every call.

    A measured layer's level is one more than the highest level of its inputs
    (over all its calls, for a shared layer); with `chained`, its outputs have
    its level, and `h` measured layers hidden in a subclassed layer are taken
    as a chain of `h` levels, since what its `call` does is unknown.
    Without `chained`, measured layers do not raise the level after them.
    Shared layers can raise levels seen earlier, so this repeats until
    nothing changes; a layer whose level keeps rising feeds itself.
    """
    level_of_layer = {}
    for _ in range(len(flat.calls) + 2):
        before = dict(level_of_layer)
        level_of_ref, call_level = {ref: 0 for ref in flat.inputs}, {}
        for call in flat.calls:
            level = max((level_of_ref.get(ref, 0) for ref in call.inputs), default=0)
            if id(call.operation) in wanted:
                own = max(level_of_layer.get(id(call.operation), 0), level + 1)
                level_of_layer[id(call.operation)] = own
                level = own if chained else level
            for index, layer in enumerate(hidden_in.get(id(call), ()), start=1):
                own = max(level_of_layer.get(id(layer), 0), level + (index if chained else 1))
                level_of_layer[id(layer)] = own
            if chained and id(call) in hidden_in:
                level = max(level, max(level_of_layer[id(layer)] for layer in hidden_in[id(call)]))
            call_level[id(call)] = level
            for ref in call.outputs:
                level_of_ref[ref] = level
        if level_of_layer == before:
            return level_of_layer, call_level
    rising = [call.operation for call in flat.calls if id(call.operation) in wanted]
    rising = [layer for layer in rising if level_of_layer[id(layer)] != before.get(id(layer))]
    name = rising[0].name if rising else "?"
    raise ValueError(
        f"BatchNormalization '{name}' is called on a tensor computed from its own output, so its "
        "statistics would depend on themselves: no exact value exists. Give each call its own "
        "BatchNormalization layer."
    )


def _first_ref(call):
    """The `Ref` of a BatchNormalization call's input."""
    first = call.args[0] if call.args else call.kwargs.get("inputs")
    return first if isinstance(first, graph_module.Ref) else call.inputs[0]


@dataclasses.dataclass(eq=False)
class _Step:
    """One compiled function: the calls of steps `(start, stop]`, moments, and the cut it keeps."""

    inputs: list
    calls: list
    targets: list  # [(layer, Ref)]
    probes: list  # [(Call, [layers])]
    keep: list

    @property
    def measured(self):
        """The layer of each moment the step's function returns: the targets', then the probed."""
        return [layer for layer, _ in self.targets] + [layer for _, layers in self.probes for layer in layers]


def _step(plan, start, stop, store):
    """The calls after the cut of step `start` that measure level `stop + 1`."""
    targets = plan.targets.get(stop + 1, [])
    probes_here = plan.probes.get(stop + 1, [])
    wanted = {ref for _, ref in targets} | {ref for call, _ in probes_here for ref in call.inputs}
    keep = []
    if store:
        keep = [ref for ref in _cut(plan, stop) if plan.made[ref] > start]
        wanted.update(keep)
    calls = []
    for call in reversed(plan.flat.calls):
        step = plan.call_step.get(id(call))
        if step is not None and start < step <= stop and any(ref in wanted for ref in call.outputs):
            calls.append(call)
            wanted.update(call.inputs)
    calls.reverse()
    inputs = [ref for ref in _cut(plan, start) if ref in wanted]
    return _Step(inputs=inputs, calls=calls, targets=targets, probes=probes_here, keep=keep)


def _cut(plan, step):
    """The tensors made by step `step` or before and read after it (in a fixed order)."""
    return [ref for ref, made in plan.made.items() if made <= step < plan.last_use.get(ref, -1)]


# Running ---------------------------------------------------------------------


class _Run:
    """The state of one `measure`: the cut kept so far, and what it cost."""

    def __init__(self, plan, capture, stats, limit, batch_count):
        self.plan, self.capture, self.stats, self.limit = plan, capture, stats, limit
        self.batch_count = batch_count
        self.kept = {}  # Ref -> [value per batch]
        self.kept_bytes = 0
        self.kept_step = -1
        self.peak = 0
        self.work = 0

    def start(self, values):
        for index, ref in enumerate(self.plan.flat.inputs):
            self.kept[ref] = [batch[index] for batch in values]
        self.kept_bytes = self.peak = _bytes(self.kept)

    def passes(self):
        return self.work / (self.plan.needed * self.batch_count) if self.plan.needed else 0.0

    def step(self, step, progress):
        store = step + 1 < self.plan.levels  # the last step keeps nothing
        function = self._function(self.kept_step, step, store)
        kept = collections.defaultdict(list)
        for index in range(self.batch_count):
            inputs = [self.kept[ref][index] for ref in function.step.inputs]
            outputs, moments = function(inputs)
            self.work += len(function.step.calls) + len(function.step.probes)
            for layer, values in zip(function.step.measured, moments):
                count, mean, m2 = (keras.ops.convert_to_numpy(value) for value in values)
                if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))):
                    raise ValueError(
                        f"The input of BatchNormalization '{layer.name}' is not finite (NaN or infinity) in "
                        f"batch {index} of the data (counting from 0), so its statistics would be NaN; no "
                        "statistics were changed. Look for NaN or infinite values in that batch, or in the "
                        "weights of the layers before this one."
                    )
                self.stats[id(layer)].merge(count, mean, m2)
            if store:
                for ref, value in zip(function.step.keep, outputs):
                    kept[ref].append(value)
                if index == 0 and self.kept_bytes + _bytes(kept) * self.batch_count > self.limit:
                    store = False  # this cut does not fit: the next step starts from the last one again
                    kept.clear()
                    function = self._function(self.kept_step, step, store)
            if progress is not None:
                progress.add(1)
        if store:
            self.peak = max(self.peak, self.kept_bytes + _bytes(kept))  # the old cut and the new, at once
            for ref in _cut(self.plan, step):
                if ref not in kept:  # made before this step, still read after it
                    kept[ref] = self.kept[ref]
            self.kept, self.kept_step = dict(kept), step
            self.kept_bytes = _bytes(self.kept)

    def _function(self, start, stop, store):
        key = (start, stop, store)
        function = self.plan.functions.get(key)
        if function is None:
            function = compiled.Function(_step(self.plan, start, stop, store), self.plan.jit_compile)
            # Kept for the next call, except the steps that compute again after a cut that did
            # not fit: there are many, each larger, and memory is what is short then.
            if store or stop + 1 == self.plan.levels:
                self.plan.functions[key] = function
        function.capture = self.capture
        return function



def _bytes(kept):
    """The bytes of the tensors in `kept` (`Ref` -> a value per batch)."""
    total = 0
    for values in kept.values():
        for value in values:
            for leaf in keras.tree.flatten(value):
                dtype = np.dtype(keras.backend.standardize_dtype(leaf.dtype))
                total += int(np.prod(leaf.shape)) * dtype.itemsize
    return total


# Memory ----------------------------------------------------------------------


def check_cache_limit(cache_limit):
    """Raise unless `cache_limit` is `"auto"` or a number of bytes."""
    if isinstance(cache_limit, str) and cache_limit == "auto":
        return
    if isinstance(cache_limit, bool) or not isinstance(cache_limit, (int, np.integer)) or cache_limit < 0:
        raise ValueError(
            "cache_limit must be a number of bytes (an int >= 0) or 'auto'. "
            f"Received: cache_limit={cache_limit!r}"
        )


def _cache_limit(cache_limit):
    check_cache_limit(cache_limit)
    if isinstance(cache_limit, str):
        return int(_available_memory() * DEFAULT_CACHE_FRACTION)
    return int(cache_limit)


def _available_memory():
    """Bytes of memory available now: MemAvailable on Linux, free pages elsewhere, else 2 GiB."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 2 * 2**30
