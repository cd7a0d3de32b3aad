"""The processes of a multi-process run, and how `recalibrate` pools statistics across them.

When a model is trained by several processes (hosts), each holds one shard
of the data, and exact statistics are those of the union of the shards.
Each process measures its own shard; after each level of BatchNormalization
layers the per-channel `(count, mean, sum of squared deviations)` of every
process are gathered, and every process merges the same rows in the same
order (process 0 first), so that all of them compute the same float64
numbers bit for bit and end with identical weights.

What counts as a multi-process run, by backend:

- JAX: `jax.process_count() > 1` (`jax.distributed.initialize`, which
  `keras.distribution.initialize` calls).
- TensorFlow: the model's `distribute_strategy` (the strategy whose scope it
  was made in) is a `MultiWorkerMirroredStrategy` over more than one task.
- PyTorch: a `torch.distributed` process group of more than one process.

Every exchange is in two rounds: a status (did this process fail, how much
it sends) and then the data, so that a process that failed (bad data, NaN)
makes every process raise instead of leaving the others waiting.
"""

import contextlib
import hashlib
import json

import keras
import numpy as np


class ProcessFailure(RuntimeError):
    """Another process of the run failed; this one stops too, with nothing changed."""


class Processes:
    """A group of processes that share one recalibration.

    Attributes:
        count: int. How many processes.
        rank: int. This process's place among them (0 first).
        kind: str. What makes them a group (for messages).
    """

    def __init__(self, count, rank, kind):
        self.count, self.rank, self.kind = count, rank, kind

    def exchange(self, vector, failure=None):
        """Every process's `vector` (float64, 1-D), rows in rank order; raises if any process failed.

        Args:
            vector: array. This process's contribution (ignored when it
                failed).
            failure: Exception, optional. Why this process cannot go on; it
                is raised here after the others have been told.

        Returns:
            A float64 array of shape `(count, len(vector))`.

        Raises:
            The `failure` given, `ProcessFailure` if another process failed,
            `ValueError` if the processes send different lengths (their
            models differ).
        """
        vector = np.zeros(0) if vector is None or failure is not None else np.asarray(vector, np.float64)
        status = self._gather(np.array([0.0 if failure is not None else 1.0, float(vector.size)]))
        if failure is not None:
            raise failure
        failed = [rank for rank, row in enumerate(status) if row[0] != 1.0]
        if failed:
            raise ProcessFailure(
                f"recalibrate failed on process {failed[0]} of {self.count} ({self.kind}); this process "
                f"(rank {self.rank}) stopped with its statistics as they were. The error is in process "
                f"{failed[0]}'s output."
            )
        sizes = sorted({int(row[1]) for row in status})
        if len(sizes) > 1:
            raise ValueError(
                f"The processes of this {self.kind} run hold different models: they would exchange "
                f"{sizes} values. Every process must recalibrate the same model. Received on rank "
                f"{self.rank}: {vector.size} values"
            )
        return self._gather(vector)

    def _gather(self, vector):
        # The bytes, as 32-bit integers: exact whatever the backend's float width (JAX keeps
        # float32 unless x64 is on, and would round float64 statistics).
        words = np.ascontiguousarray(vector, np.float64).view(np.int32)
        rows = np.asarray(self._gather_words(words), np.int32).reshape(self.count, -1)
        return np.ascontiguousarray(rows).view(np.float64).reshape(self.count, -1)

    def _gather_words(self, words):
        raise NotImplementedError


@contextlib.contextmanager
def failures_shared(processes):
    """Inside the block, an exception is first told to the other `processes` (if any), then raised.

    The others learn it at their next `exchange`, and raise `ProcessFailure`
    instead of waiting for this process.
    """
    try:
        yield
    except Exception as error:
        if processes is not None:
            processes.exchange(None, error)  # raises `error`, after telling the others
        raise


def signature(layers):
    """A few numbers that differ when two processes' lists of BatchNormalization layers differ.

    By class and statistics' shape, in order: not by name, since Keras names
    layers by a per-process counter that other models made first advance.
    """
    text = json.dumps([(type(layer).__name__, list(layer.moving_mean.shape)) for layer in layers])
    digest = hashlib.sha256(text.encode()).digest()[:12]
    return np.frombuffer(digest, np.uint32).astype(np.float64)


def pack(pooled, sizes):
    """`Pooled` statistics as one float64 vector: for each, its count, then its mean and m2 per channel."""
    parts = []
    for each, size in zip(pooled, sizes):
        if each.count:
            parts += [[float(each.count)], np.ravel(each.mean), np.ravel(each.m2)]
        else:
            parts += [[0.0], np.zeros(size), np.zeros(size)]
    return np.concatenate(parts) if parts else np.zeros(0)


def merge_rows(rows, pooled_type, sizes):
    """The `Pooled` of each layer, merged over `rows` (one per process) in rank order."""
    merged = [pooled_type() for _ in sizes]
    for row in rows:
        offset = 0
        for index, size in enumerate(sizes):
            count = int(row[offset])
            mean = row[offset + 1 : offset + 1 + size]
            m2 = row[offset + 1 + size : offset + 1 + 2 * size]
            merged[index].merge(count, mean, m2)
            offset += 1 + 2 * size
    return merged


def processes_of(model):
    """The `Processes` this model is recalibrated by, or `None` for one process."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if jax.process_count() > 1:
            return _JaxProcesses()
    elif backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is not None and _workers(strategy) > 1:
            return _TensorFlowProcesses(strategy)
    elif backend == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return _TorchProcesses()
    return None


class _JaxProcesses(Processes):
    def __init__(self):
        import jax

        super().__init__(jax.process_count(), jax.process_index(), "jax.distributed")

    def _gather_words(self, words):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(words, tiled=False))


def _workers(strategy):
    """How many tasks (processes) a MultiWorkerMirroredStrategy spans; 1 for any other strategy."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker"))


class _TensorFlowProcesses(Processes):
    """The tasks of a MultiWorkerMirroredStrategy, gathered by a replica-context all-gather.

    Each replica sends its task's rank with the words; a task with several
    local replicas (GPUs) sends the same row from each, and one per rank is
    kept.
    """

    def __init__(self, strategy):
        resolver = strategy.cluster_resolver
        spec = resolver.cluster_spec()
        jobs = [job for job in ("chief", "worker") if job in spec.jobs]
        tasks = [(job, index) for job in jobs for index in range(spec.num_tasks(job))]
        rank = tasks.index((resolver.task_type, resolver.task_id))
        super().__init__(len(tasks), rank, "MultiWorkerMirroredStrategy")
        self.strategy = strategy
        self._function = None

    def _gather_words(self, words):
        import tensorflow as tf

        if self._function is None:
            # Compiled: run eagerly, each collective is traced anew (and TensorFlow warns of it).
            def gather(row):
                # Made in the replica's device scope: a traced argument has no device, and the
                # all-gather would have no destination.
                row = tf.identity(row)
                return tf.distribute.get_replica_context().all_gather(row, axis=0)

            self._function = tf.function(lambda row: self.strategy.run(gather, args=(row,)))
        # The collective needs a static length: padded to a power of two, a few traces in all.
        size = 1 << int(np.ceil(np.log2(len(words) + 1)))
        row = np.zeros((1, size), np.int32)
        row[0, 0], row[0, 1 : len(words) + 1] = self.rank, words
        rows = self.strategy.experimental_local_results(self._function(tf.constant(row)))[0].numpy()
        rows = rows[:, : len(words) + 1]
        by_rank = {int(each[0]): each[1:] for each in rows}
        return np.stack([by_rank[rank] for rank in range(self.count)])


class _TorchProcesses(Processes):
    def __init__(self):
        import torch.distributed as dist

        super().__init__(dist.get_world_size(), dist.get_rank(), "torch.distributed")

    def _gather_words(self, words):
        import torch
        import torch.distributed as dist

        # The gloo backend gathers CPU tensors; NCCL would need them on this process's GPU.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        local = torch.as_tensor(words, dtype=torch.int32, device=device)
        rows = [torch.empty_like(local) for _ in range(self.count)]
        dist.all_gather(rows, local)
        return np.stack([row.cpu().numpy() for row in rows])
