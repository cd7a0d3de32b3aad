"""Run by tests/test_distributed.py in subprocesses, on JAX: the device count
(XLA_FLAGS) and `jax.distributed` are set up once per process.

    python jax_worker.py devices OUT.npz                 (two simulated CPU devices)
    python jax_worker.py process OUT.npz RANK PORT       (one of two processes on 127.0.0.1)
    python jax_worker.py reference OUT.npz               (one process, all the data)

Each writes what it measured to OUT for the test to compare.
"""

import os
import sys

import numpy as np
import shards

PROCESSES = 2


def training_data():
    """Two steps of a global batch of 8 whose halves come from different distributions."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (8, 4)), rng.normal(3, 2, (8, 4))]).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    # Step s takes rows [4s, 4s + 4) of each half: process p's own rows are x[8p + 4s: 8p + 4s + 4].
    return x, y


def global_batches(x, y):
    """The same data as one process sees it: each global batch is both halves' rows of that step."""
    order = np.concatenate([np.r_[4 * s : 4 * s + 4, 8 + 4 * s : 8 + 4 * s + 4] for s in range(2)])
    return x[order], y[order]


def train(model, x, y, batch_size):
    import keras

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)


def devices(out):
    """One process, two devices: training, recalibrate and fold under DataParallel against one device."""
    import jax
    import keras

    import bnseq

    assert len(jax.devices()) == 2, jax.devices()
    x, y = training_data()
    gx, gy = global_batches(x, y)
    data = shards.recalibration_data()
    arrays = {}

    one = shards.make()
    train(one, gx, gy, batch_size=8)
    arrays.update(shards.weights_of(one, "one/trained"))
    bnseq.recalibrate(one, data, batch_size=8, verbose=0)
    arrays.update(shards.weights_of(one, "one/recalibrated"))
    arrays["one/folded"] = bnseq.fold(one).predict(data, verbose=0)
    arrays["one/predicted"] = one.predict(data, verbose=0)

    arrays.update(shards.fit_with_callback("one/callback"))

    distribution = keras.distribution.DataParallel(devices=jax.devices())
    with distribution.scope():
        arrays.update(shards.fit_with_callback("two/callback"))
        two = shards.make()
        train(two, gx, gy, batch_size=8)
        arrays.update(shards.weights_of(two, "two/trained"))
        arrays["two/sharding"] = np.array(str(two.layers[1].moving_mean.value.sharding))
        bnseq.recalibrate(two, data, batch_size=8, verbose=0)
        arrays.update(shards.weights_of(two, "two/recalibrated"))
        arrays["two/folded"] = bnseq.fold(two).predict(data, verbose=0)
        arrays["two/predicted"] = two.predict(data, verbose=0)

    # Without synchronizing: each device's half alone, as one device sees it (the comparison can fail).
    halves = shards.make()
    train(halves, x[:8], y[:8], batch_size=4)
    arrays.update(shards.weights_of(halves, "halves/trained"))
    np.savez(out, **arrays)


def process(out, rank, port):
    """One of two processes: train on this process's half of each global batch, recalibrate on its shard."""
    import jax
    import keras

    keras.distribution.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES, process_id=rank)
    assert jax.process_count() == PROCESSES
    distribution = keras.distribution.DataParallel()
    distribution.auto_shard_dataset = False  # each process passes its own shard
    keras.distribution.set_distribution(distribution)
    x, y = training_data()
    model = shards.make()
    train(model, x[8 * rank : 8 * rank + 8], y[8 * rank : 8 * rank + 8], batch_size=4)
    arrays = shards.weights_of(model, "trained")
    arrays.update(shards.recalibrate_on_shard(model, rank, "jax.distributed"))
    np.savez(out, **arrays)


def reference(out):
    """One process on all the data: what the two processes must agree with."""
    x, y = training_data()
    gx, gy = global_batches(x, y)
    model = shards.make()
    train(model, gx, gy, batch_size=8)
    arrays = shards.weights_of(model, "trained")
    arrays.update(shards.reference(model))
    np.savez(out, **arrays)


if __name__ == "__main__":
    # Before Keras and JAX are imported (each function imports them): the backend, and for
    # `devices` two simulated CPU devices.
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "devices":
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    if mode == "devices":
        devices(target)
    elif mode == "process":
        process(target, int(sys.argv[3]), int(sys.argv[4]))
    else:
        reference(target)
