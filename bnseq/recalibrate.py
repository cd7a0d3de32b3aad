"""`bnseq.recalibrate`: exact BatchNormalization statistics over data.

A BatchNormalization's moving mean and variance are an exponential average of
training batches; after swapping in averaged (EMA, SWA) weights, editing or
pruning weights, or training with tiny batches they no longer describe what
the layer sees. `recalibrate` replaces them with the exact mean and (biased,
as Keras's batch statistics) variance of each layer's input over the data, in
inference mode, with every BatchNormalization before it already recalibrated:
the statistics the layer meets at inference.

How: each BatchNormalization's `call` is wrapped for the duration, to pool the
per-channel count, mean and sum of squared deviations of its input (Chan et
al.'s pairwise update, in float64, exact for batches of any size). Layers are
taken in dependency order, in levels: a level's layers depend on no other
layer of the same level, so one pass over the data measures all of them; a
pass stops each batch as soon as its level has been measured.
"""

import dataclasses

import keras
import numpy as np

from bnseq import graph as graph_module
from bnseq import probes


class _Measured(Exception):
    """Raised inside a forward pass once every layer of the level has its batch."""


@dataclasses.dataclass(frozen=True)
class Recalibration:
    """What `recalibrate` did to one BatchNormalization.

    Attributes:
        batch_norm: str. The layer's name.
        samples: int. How many values each channel's statistics pool (batch
            items times the positions of the other axes).
        mean_change: float. The largest absolute change of `moving_mean`.
        variance_change: float. The largest absolute change of
            `moving_variance`.
    """

    batch_norm: str
    samples: int
    mean_change: float
    variance_change: float


class RecalibrationReport(list):
    """A list of `Recalibration`, one per BatchNormalization, that prints as a table."""

    def __str__(self):
        width = max([len("BatchNormalization")] + [len(row.batch_norm) for row in self])
        lines = [f"{'BatchNormalization':<{width}}  {'samples':>10}  {'max |Δ mean|':>12}  {'max |Δ var|':>12}"]
        for row in self:
            lines.append(
                f"{row.batch_norm:<{width}}  {row.samples:>10,}  {row.mean_change:>12.4g}  "
                f"{row.variance_change:>12.4g}"
            )
        return "\n".join(lines)


def recalibrate(model, data, *, batch_size=None, steps=None, verbose="auto"):
    """Sets every BatchNormalization's moving statistics to their exact values over `data`.

    For each BatchNormalization, `moving_mean` and `moving_variance` become the
    mean and the biased variance of its input over all of `data`, computed in
    inference mode with every BatchNormalization before it already
    recalibrated. Nothing else in the model changes.

    Cost: one pass over `data` per level of BatchNormalization layers, where a
    level holds the layers with no BatchNormalization between them (a layer
    needs the final statistics of those before it); each pass stops every
    batch at its level, so the pass for the first layers is short. A chain of
    `n` BatchNormalization layers takes `n` passes, about `n / 2` full forward
    passes of work. The calls run eagerly, batch by batch.

    Args:
        model: `keras.Model`. Sequential or functional, nested models and
            layers holding BatchNormalization included.
        data: what the model takes: a NumPy array (or a list/dict of them for
            several inputs), a `tf.data.Dataset` of `x` or `(x, y[, w])`
            batches, a `keras.utils.PyDataset`, or a Python iterable of
            batches (kept in memory, as it is read several times).
        batch_size: int, optional. For arrays: the batch size (default 32).
        steps: int, optional. Use only the first `steps` batches.
        verbose: `"auto"`, 0 or 1. A progress bar over the passes (shown
            unless 0).

    Returns:
        `RecalibrationReport`: one `Recalibration` per BatchNormalization, in
        model order; `print` it for a table.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: if `data` has no batches, or the model has channels_first
            layers that TensorFlow cannot run eagerly on this CPU (see
            `bnseq.PlatformWarning`).

    Example:

    >>> model = bnseq.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(4)], batch_norm=True)
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(50, 3)).astype("float32")
    >>> report = bnseq.recalibrate(model, x, batch_size=16, verbose=0)
    >>> [(row.batch_norm, row.samples) for row in report]  # doctest: +ELLIPSIS
    [('dense..._bn', 50)]
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "recalibrate expects a keras.Model. "
            f"Received: model={model!r} (of type {type(model).__name__})"
        )
    if probes.needs_xla(model):
        raise ValueError(
            f"recalibrate runs {type(model).__name__} '{model.name}' eagerly, batch by batch, and "
            "TensorFlow on this CPU has no eager kernels for its channels_first layers (oneDNN is "
            f"off; {probes.ONEDNN_ISSUE}). Set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is "
            "imported, or use the JAX or PyTorch backend."
        )
    batches = batches_of(data, batch_size, steps)
    if not batches:
        raise ValueError(f"recalibrate needs data with at least one batch. Received: data={data!r}")
    graph = graph_module.walk(model)
    levels = _levels(graph)
    progress = None
    if verbose != 0 and levels:
        progress = keras.utils.Progbar(len(levels) * len(batches), unit_name="batch")
    rows = {}
    for level in levels:
        stats = measure(model, batches, level, progress)
        for layer in level:
            rows[id(layer)] = _set_statistics(layer, stats[id(layer)])
    in_order = []  # model order: each leaf's hidden BatchNormalization layers, then the leaf itself
    for leaf in graph.layers:
        in_order.extend(graph.hidden_batch_norms(leaf))
        if isinstance(leaf, keras.layers.BatchNormalization):
            in_order.append(leaf)
    return RecalibrationReport(rows[id(layer)] for layer in in_order)


def measure(model, batches, batch_norms, progress=None):
    """Pool the inputs of `batch_norms` over `batches` in one pass, in inference mode.

    Each batch's forward pass stops once every one of them has its input.

    Returns:
        dict: `id(layer)` -> `_Pooled` (`count`, `mean`, and `m2`, the sum of
        squared deviations, per channel, float64).
    """
    stats = {id(layer): _Pooled() for layer in batch_norms}
    with _Recording(batch_norms, stats):
        for x in batches:
            try:
                model(x, training=False)
            except _Measured:
                pass
            for each in stats.values():
                each.batch_done = False
            if progress is not None:
                progress.add(1)
    return stats


class _Pooled:
    """Per-channel count, mean and sum of squared deviations, pooled over batches (float64)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None
        self.batch_done = False

    def add(self, values, axis):
        values = np.asarray(values, np.float64)
        values = np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis])
        count = values.shape[0]
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / total
        self.count = total


class _Recording:
    """Wraps the `call` of each layer of a level to pool its input, for a `with` block."""

    def __init__(self, level, stats):
        self.level, self.stats = level, stats

    def __enter__(self):
        for layer in self.level:
            layer.call = self._recorder(layer, layer.call)
        return self

    def __exit__(self, *exc):
        for layer in self.level:
            del layer.call  # the class's own `call` again
        return False

    def _recorder(self, layer, call):
        stats, all_stats = self.stats[id(layer)], self.stats

        def recording_call(inputs, *args, **kwargs):
            if not stats.batch_done:
                stats.add(keras.ops.convert_to_numpy(inputs), layer.axis)
                stats.batch_done = True
            if all(each.batch_done for each in all_stats.values()):
                raise _Measured()
            return call(inputs, *args, **kwargs)

        return recording_call


def _set_statistics(layer, stats):
    old_mean = keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
    old_variance = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
    if stats.count == 0:  # never reached by the data (an unused branch): left as it was
        return Recalibration(layer.name, 0, 0.0, 0.0)
    variance = stats.m2 / stats.count
    layer.moving_mean.assign(stats.mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    return Recalibration(
        layer.name,
        int(stats.count),
        float(np.max(np.abs(stats.mean - old_mean))),
        float(np.max(np.abs(variance - old_variance))),
    )


def _levels(graph):
    """BatchNormalization layers grouped so that no layer depends on one of its own group."""
    level_of = {}  # id(leaf) -> the level of the last BatchNormalization at or before it (0: none)
    levels = []
    for leaf in graph.layers:
        upstream = max((level_of.get(id(producer), 0) for producer in graph.producers(leaf)), default=0)
        hidden = graph.hidden_batch_norms(leaf)
        for inner in hidden:  # inside a subclassed layer: taken as a chain, to be safe
            upstream += 1
            _place(levels, upstream, inner)
        if isinstance(leaf, keras.layers.BatchNormalization):
            upstream += 1
            _place(levels, upstream, leaf)
        level_of[id(leaf)] = upstream
    return levels


def _place(levels, level, layer):
    while len(levels) < level:
        levels.append([])
    levels[level - 1].append(layer)


def batches_of(data, batch_size, steps):
    """The batches of `x` in `data`, as a list (read once per pass)."""
    if isinstance(data, keras.utils.PyDataset):
        batches = [_x_of(data[index]) for index in range(len(data))]
    elif _is_arrays(data):
        batches = _array_batches(data, batch_size or 32)
    else:
        if hasattr(data, "as_numpy_iterator"):  # a tf.data.Dataset
            data = data.as_numpy_iterator()
        batches = [_x_of(batch) for batch in data]
    return batches[:steps] if steps is not None else batches


def _is_arrays(data):
    """An array, a tensor, or a list/tuple/dict of them: the model's whole input."""
    if isinstance(data, (list, tuple, dict)) and not data:
        return False
    leaves = keras.tree.flatten(data) if isinstance(data, (list, tuple, dict)) else [data]
    return all(hasattr(leaf, "shape") and hasattr(leaf, "__len__") for leaf in leaves)


def _array_batches(data, batch_size):
    leaves = keras.tree.flatten(data)
    size = len(leaves[0])
    return [
        keras.tree.map_structure(lambda array, start=start: np.asarray(array[start : start + batch_size]), data)
        for start in range(0, size, batch_size)
    ]


def _x_of(batch):
    """`x` of a batch given as `x`, `(x,)`, `(x, y)` or `(x, y, w)`."""
    if isinstance(batch, tuple) and 1 <= len(batch) <= 3:
        return batch[0]
    return batch
