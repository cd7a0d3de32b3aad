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

The decisions on plain values (levels, which calls each step makes, which
tensors cross each cut) are the plan, made in `plans.py`; here the plan runs,
and whether a cut fits in `cache_limit` is decided as it runs. `compiled.py` turns
a step into a function compiled as `predict` is (a `tf.function` on
TensorFlow, by XLA where channels_first layers need it, `jax.jit` of a
stateless call on JAX, eager without gradients on PyTorch). The plan and its
compiled steps are kept for the model (weakly), so that a second call on the
same model compiles nothing.
"""

import collections
import dataclasses
import os

import keras
import numpy as np

from bnseq import internals
from bnseq import probes
from bnseq.reading import graph as graph_module
from bnseq.statistics import collective
from bnseq.statistics import compiled
from bnseq.statistics import data
from bnseq.statistics import plans

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
        plan = plans.plan_for(model, flat, batch_norms, chained, order)
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
            for ref in plans.cut(self.plan, step):
                if ref not in kept:  # made before this step, still read after it
                    kept[ref] = self.kept[ref]
            self.kept, self.kept_step = dict(kept), step
            self.kept_bytes = _bytes(self.kept)

    def _function(self, start, stop, store):
        key = (start, stop, store)
        function = self.plan.functions.get(key)
        if function is None:
            function = compiled.Function(plans.step_calls(self.plan, start, stop, store), self.plan.jit_compile)
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
