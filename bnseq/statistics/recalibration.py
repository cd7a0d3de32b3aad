"""`bnseq.recalibrate`: exact BatchNormalization statistics over data.

A BatchNormalization's moving mean and variance are an exponential average of
training batches; after swapping in averaged (EMA, SWA) weights, editing or
pruning weights, or training with tiny batches they no longer describe what
the layer sees. `recalibrate` replaces them with the exact mean and (biased,
as Keras's batch statistics) variance of each layer's input over the data, in
inference mode, with every BatchNormalization before it already recalibrated:
the statistics the layer meets at inference. The computation is in
`segments.py`: the model runs segment by segment, one per level of
BatchNormalization layers, keeping each segment's activations for the next,
so that the whole job costs about one forward pass.
"""

import dataclasses

import keras
import numpy as np

from bnseq import probes
from bnseq.reading import graph as graph_module
from bnseq.reading import holding
from bnseq.statistics import collective
from bnseq.statistics import data as data_module
from bnseq.statistics import segments


@dataclasses.dataclass(frozen=True)
class Recalibration:
    """What `recalibrate` did to one BatchNormalization.

    Attributes:
        batch_norm: str. The layer's name.
        samples: int. How many values each channel's statistics pool (batch
            items times the positions of the other axes; over all processes
            when several pooled their data).
        mean_change: float. The largest absolute change of `moving_mean`.
        variance_change: float. The largest absolute change of
            `moving_variance`.
    """

    batch_norm: str
    samples: int
    mean_change: float
    variance_change: float


class RecalibrationReport(list):
    """A list of `Recalibration`, one per BatchNormalization, that prints as a table.

    Attributes:
        passes: float. The work done, in forward passes over the data (1.0
            when every segment's activations could be kept; more when
            `cache_limit` made some be computed again).
        cache_peak: int. The most bytes of activations kept at once (on
            this process).
        processes: int. How many processes pooled their data (1 unless
            the run spans several; see `recalibrate`).
        frozen: tuple of str. The BatchNormalization layers left alone
            because their statistics are frozen (`include_frozen=False`).
    """

    def __init__(self, rows=(), passes=0.0, cache_peak=0, processes=1, frozen=()):
        super().__init__(rows)
        self.passes, self.cache_peak, self.processes = passes, cache_peak, processes
        self.frozen = tuple(frozen)

    def __str__(self):
        width = max([len("BatchNormalization")] + [len(row.batch_norm) for row in self])
        lines = [f"{'BatchNormalization':<{width}}  {'samples':>10}  {'max |Δ mean|':>12}  {'max |Δ var|':>12}"]
        for row in self:
            lines.append(
                f"{row.batch_norm:<{width}}  {row.samples:>10,}  {row.mean_change:>12.4g}  "
                f"{row.variance_change:>12.4g}"
            )
        lines.append(
            f"{self.passes:.2f} forward passes of work; at most {self.cache_peak / 2**20:,.1f} MiB of "
            "activations kept"
        )
        if self.processes > 1:
            lines.append(f"statistics pooled over {self.processes} processes, each on its own data")
        if self.frozen:
            lines.append(f"left alone, their statistics frozen: {', '.join(self.frozen)}")
        return "\n".join(lines)


def recalibrate(
    model, data, *, batch_size=None, steps=None, verbose="auto", cache_limit="auto", include_frozen=False
):
    """Sets every BatchNormalization's moving statistics to their exact values over `data`.

    For each BatchNormalization, `moving_mean` and `moving_variance` become the
    mean and the biased variance of its input over all of `data` (pooled
    over every call of a shared layer), computed in inference mode with every
    BatchNormalization before it already recalibrated. Nothing else in the
    model changes. A BatchNormalization whose statistics are frozen
    (`trainable=False`, or held by `bnseq.freeze`) is left alone unless
    `include_frozen=True`; the layers after it are measured with its
    statistics as they are.

    Cost: about one pass over `data`. A layer needs the final statistics of
    the BatchNormalization layers before it, so they are measured level by
    level (ResNet50 has 49 levels); rather than running the model again from
    its inputs for each level, each batch goes through one segment of the
    model per level, and the activations the next segment reads are kept for
    all of `data`, up to `cache_limit` bytes. Where a segment's activations
    would not fit, they are not kept and the next level is computed again
    from the last ones that were (from `data` itself with `cache_limit=0`,
    about `levels / 2` passes); `report.passes` says how much work it was.
    Each segment is compiled once, as `predict` compiles the model
    (`tf.function` on TensorFlow, `jax.jit` on JAX, eager on PyTorch), and
    the compiled segments are kept for the next call on the same model.
    Measured by benchmarks/recalibrate.py (ResNet50 at 64x64, 512 samples,
    TensorFlow on a 2-core CPU): 1.4x to 1.8x the time of one `predict`.
    BatchNormalization layers inside subclassed layers cannot be reached
    between segments: their layer is run once more for each of them.

    Several processes: where the model is trained by several processes
    (`jax.distributed`, which `keras.distribution.initialize` starts;
    a `MultiWorkerMirroredStrategy` whose scope the model was made in; a
    `torch.distributed` process group), each process calls `recalibrate`
    on its own shard of the data, and the statistics are those of the union
    of the shards: exact for shards of any size, and the same on every
    process, bit for bit. Each process computes on its own shard; after each
    level they exchange, per BatchNormalization, its count and per-channel
    mean and sum of squared deviations (`2 * channels + 1` float64 numbers
    per process), after a round of two numbers that says whether every
    process succeeded; every process merges the rows in the same order. If
    any process fails, all of them raise and none changes its statistics.

    Args:
        model: `keras.Model`. Sequential or functional, nested models and
            layers holding BatchNormalization included.
        data: what the model takes: a NumPy array (or a list/dict of them for
            several inputs), a `tf.data.Dataset` of `x` or `(x, y[, w])`
            batches, a `keras.utils.PyDataset`, or a Python iterable of
            batches (all read into memory first; with `steps`, only those).
            A list of arrays is one array per input when the model has that
            many inputs of those ranks (as `predict` reads it), and a list of
            batches when each item fits the model's inputs. A path is
            refused: load the file first (`np.load`).
            Where a BatchNormalization's input carries a Keras mask (after
            `Embedding(mask_zero=True)` or `Masking`), only the positions the
            mask keeps are counted, as Keras's own layer computes its batch
            statistics.
        batch_size: int, optional. For arrays: the batch size (default 32).
        steps: int, optional. Read and use only the first `steps` batches
            (an endless generator is fine).
        verbose: `"auto"`, 0 or 1. A progress bar with one step per batch
            and level (shown unless 0).
        cache_limit: int or `"auto"`. Bytes of activations that may be kept
            between segments (on the device the backend computes on);
            `"auto"` is half the memory available when the call starts.
        include_frozen: bool. Also set the statistics of BatchNormalization
            layers whose statistics are frozen.

    Returns:
        `RecalibrationReport`: one `Recalibration` per BatchNormalization, in
        model order; `print` it for a table.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: if `data` has no batches, a batch does not match the
            model's inputs, `batch_size`, `steps` or `cache_limit` is not
            valid, a BatchNormalization's input is not finite (NaN or
            infinity: the error names the layer and the batch), or a
            BatchNormalization takes its own output as input, or every
            BatchNormalization is frozen and `include_frozen` is `False`.
            The model's statistics are then left as they were.

    Examples:
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
    if not isinstance(include_frozen, bool):
        raise TypeError(f"recalibrate: `include_frozen` must be True or False. Received: {include_frozen!r}")
    processes = collective.processes_of(model)
    with collective.failures_shared(processes):  # the other processes are told, and stop too
        segments.check_cache_limit(cache_limit)
        batches = data_module.batches_of(data, batch_size, steps, model)
        if not batches:
            raise ValueError(f"recalibrate needs data with at least one batch. Received: data={data!r}")
        if not model.built:  # as predict does: the first batch builds it
            probes.infer(model, batches[0])
        flat = graph_module.flatten(model)
        in_order = flat.batch_norms()
        frozen = [] if include_frozen else [layer for layer in in_order if holding.statistics_held(layer)]
        if frozen and len(frozen) == len(in_order):
            raise ValueError(
                f"recalibrate: every BatchNormalization of model {model.name!r} has frozen statistics "
                f"({len(frozen)}: trainable=False or bnseq.freeze), so there is nothing to set. Pass "
                "include_frozen=True to set them anyway, or bnseq.unfreeze(model) first."
            )
    frozen_ids = {id(layer) for layer in frozen}
    before = {id(layer): _statistics_of(layer) for layer in in_order}
    show = verbose != 0 and in_order and (processes is None or processes.rank == 0)
    progress = keras.utils.Progbar(None, unit_name="step") if show else None

    def set_level(layers, stats):
        for layer in layers:
            if id(layer) not in frozen_ids:
                stats[id(layer)].assign_to(layer)

    # Running the data moves what else the model carries (a stateful LSTM's states, a counter in a
    # call(), seed generators): all of it is put back; only the statistics set here stay.
    statistics = [
        variable
        for layer in in_order
        if id(layer) not in frozen_ids
        for variable in (layer.moving_mean, layer.moving_variance)
    ]
    try:
        with probes.unchanged(model, keep=statistics):
            measured = segments.measure(
                model,
                batches,
                in_order,
                flat=flat,
                on_level=set_level,
                cache_limit=cache_limit,
                progress=progress,
                processes=processes,
            )
    except BaseException:
        for layer in in_order:  # a failed call leaves the model as it was
            layer.moving_mean.assign(before[id(layer)][0])
            layer.moving_variance.assign(before[id(layer)][1])
        raise
    rows = []
    for layer in _as_they_ran(in_order, measured.ran):
        if id(layer) in frozen_ids:
            continue
        pooled = measured.stats[id(layer)]
        old_mean, old_variance = (value.astype(np.float64) for value in before[id(layer)])
        if pooled.count == 0:  # never reached by the data (an unused branch): left as it was
            rows.append(Recalibration(layer.name, 0, 0.0, 0.0))
            continue
        rows.append(
            Recalibration(
                layer.name,
                int(pooled.count),
                float(np.max(np.abs(pooled.mean - old_mean))),
                float(np.max(np.abs(pooled.variance - old_variance))),
            )
        )
    return RecalibrationReport(
        rows,
        passes=measured.passes,
        cache_peak=measured.cache_peak,
        processes=processes.count if processes else 1,
        frozen=[layer.name for layer in frozen],
    )


def _as_they_ran(layers, ran):
    """`layers` (model order), with those hidden in untraced layers put in the order they ran.

    `Flat.batch_norms` can only list those in the order their layer created
    them; the measurement saw the order a real call runs them in.
    """
    ran = [layer for layer in ran if any(layer is each for each in layers)]
    slots = [index for index, layer in enumerate(layers) if any(layer is each for each in ran)]
    ordered = list(layers)
    for index, layer in zip(slots, ran):
        ordered[index] = layer
    return ordered


def _statistics_of(layer):
    return (
        keras.ops.convert_to_numpy(layer.moving_mean).copy(),
        keras.ops.convert_to_numpy(layer.moving_variance).copy(),
    )
