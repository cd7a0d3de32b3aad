"""What the multi-process workers share (tests/*_worker.py): the model, the
data split in two unequal shards, and the recalibration each process runs.

Imported by the workers after they have set up their backend.
"""

import numpy as np

SHARD = 23  # examples on rank 0; rank 1 holds the other 37


def _layers():
    """Three Dense layers, seeded: the same weights on every process."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    return [keras.Input((4,)), layers.Dense(3, activation="relu"), layers.Dense(3, activation="relu"), layers.Dense(1)]


def make(momentum=0.5, **options):
    """The three Dense layers, each batch-normalized: three levels of statistics, each after the last."""
    import bnseq

    return bnseq.Sequential(_layers(), batch_norm={"momentum": momentum, **options})


def recalibration_data():
    """60 examples whose two shards come from different distributions."""
    rng = np.random.default_rng(2)
    return np.concatenate([rng.normal(1, 1, (SHARD, 4)), rng.normal(-2, 3, (60 - SHARD, 4))]).astype("float32")


def weights_of(model, prefix):
    """The model's weights as NumPy arrays, from this process's own copy."""
    import keras

    arrays = {}
    for index, weight in enumerate(model.weights):
        value = weight.value
        if not getattr(value, "is_fully_addressable", True):  # a JAX array over several processes
            value = value.addressable_data(0)
        arrays[f"{prefix}/{index}"] = keras.ops.convert_to_numpy(value)
    return arrays


def recalibrate_on_shard(model, rank, kind):
    """Recalibrate on this rank's shard, then fail on purpose on rank 1: what the test compares."""
    import bnseq

    data = recalibration_data()
    shard = data[:SHARD] if rank == 0 else data[SHARD:]
    report = bnseq.recalibrate(model, shard, batch_size=8, verbose=0)
    arrays = weights_of(model, "recalibrated")
    arrays.update(
        shard=shard, kind=np.array(kind), samples=np.array([row.samples for row in report]),
        processes=np.array(report.processes),
    )
    before = weights_of(model, "before")
    try:  # rank 1's data has the wrong shape: both must stop, neither change anything
        bnseq.recalibrate(model, shard if rank == 0 else shard[:, :3], batch_size=8, verbose=0)
    except Exception as error:  # noqa: BLE001 - its type and message are what the test reads
        arrays["failure"] = np.array(f"{type(error).__name__}: {error}")
    after = weights_of(model, "before")
    arrays["unchanged"] = np.array(all(np.array_equal(before[key], after[key]) for key in before))
    arrays.update(batch_normalize_on_shard(rank))
    return arrays


def reference(model=None):
    """One process on all the data: `model` (default `make()`) recalibrated, and `batch_normalize`."""
    import bnseq

    model = make() if model is None else model
    report = bnseq.recalibrate(model, recalibration_data(), batch_size=8, verbose=0)
    arrays = weights_of(model, "recalibrated")
    arrays["samples"] = np.array([row.samples for row in report])
    arrays.update(weights_of(bnseq.batch_normalize(plain(), data=recalibration_data(), batch_size=8), "normalized"))
    return arrays


def fit_with_callback(prefix, **options):
    """Two epochs of `fit` with `bnseq.callbacks.Recalibrate` and validation: what it recorded."""
    import keras

    import bnseq

    model = make(momentum=0.99, **options)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = recalibration_data()
    y = x.sum(axis=1, keepdims=True)
    callback = bnseq.callbacks.Recalibrate(x, batch_size=20)
    history = model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=20, verbose=0, callbacks=[callback])
    return {
        f"{prefix}/epochs": np.array([-1 if epoch is None else epoch for epoch, _ in callback.reports]),
        f"{prefix}/val_loss": np.array(history.history["val_loss"]),
        f"{prefix}/evaluated": np.array(model.evaluate(x, y, batch_size=20, verbose=0)),
        f"{prefix}/samples": np.array([row.samples for row in callback.reports[-1][1]]),
    }


def plain():
    """The same network as `make`, without batch normalization: what `batch_normalize` rewrites."""
    import keras

    return keras.Sequential(_layers())


def batch_normalize_on_shard(rank):
    """`batch_normalize(data=)` with this rank's shard: the weights of the model it returns."""
    import bnseq

    data = recalibration_data()
    shard = data[:SHARD] if rank == 0 else data[SHARD:]
    return weights_of(bnseq.batch_normalize(plain(), data=shard, batch_size=8), "normalized")
