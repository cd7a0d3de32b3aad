"""Run by tests/test_distributed.py in subprocesses: TensorFlow sets up its
devices (two logical CPUs) or its cluster (TF_CONFIG) once per process.

    python distributed_worker.py mirrored OUT.json
    python distributed_worker.py multi_worker OUT.npz MODE   (TF_CONFIG set; MODE: loop, fit or recalibrate)
    python distributed_worker.py reference OUT.npz           (one process: recalibrate on all the data)

Each writes what it measured to OUT for the test to compare.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def make(batch_norm):
    import keras
    from keras import layers

    import bnseq

    keras.utils.set_random_seed(0)
    return bnseq.Sequential(
        [keras.Input((4,)), layers.Dense(3, activation="relu"), layers.Dense(1)],
        batch_norm=batch_norm,
    )


def statistics(model):
    from keras import layers

    bn = next(layer for layer in model.layers if isinstance(layer, layers.BatchNormalization))
    return {
        "moving_mean": bn.moving_mean.numpy().tolist(),
        "moving_variance": bn.moving_variance.numpy().tolist(),
    }


def mirrored(out):
    """One step, momentum 0, global batch 8 split over two replicas whose
    halves have different means: moving statistics against one device."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    import bnseq

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (4, 4)), rng.normal(3, 2, (4, 4))]).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")

    def one_step(model):
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return statistics(model)

    results = {"replicas": None}
    single = make({"momentum": 0.0})
    results["single_device"] = one_step(single)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results["replicas"] = strategy.num_replicas_in_sync
    for name, synchronized in (("synchronized", True), ("unsynchronized", False)):
        with strategy.scope():
            model = make({"momentum": 0.0, "synchronized": synchronized})
            model.set_weights(make({"momentum": 0.0}).get_weights())
            results[name] = one_step(model)

    # bnseq.callbacks.Recalibrate inside fit under the strategy, against one device.
    import shards

    callback = {"one": shards.fit_with_callback("one"), "two": None}
    with strategy.scope():  # synchronized: each replica holds half of each batch
        callback["two"] = shards.fit_with_callback("two", synchronized=True)
    results["callback"] = {
        name: {key.split("/")[1]: value.tolist() for key, value in arrays.items()} for name, arrays in callback.items()
    }

    # bnseq.quantize_aware in the scope: each unit normalizes as its BatchNormalization would, so a
    # synchronized one takes the statistics of the whole batch, as on one device.
    def quantize_aware_step(model):
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        unit = next(layer for layer in model.layers if isinstance(layer, bnseq.QuantizedLinear))
        return {
            "moving_mean": unit.batch_norm.moving_mean.numpy().tolist(),
            "moving_variance": unit.batch_norm.moving_variance.numpy().tolist(),
            "ranges": [float(v.numpy()) for v in model.weights if v.path.endswith(("minimum", "maximum"))],
        }

    results["quantize_aware"] = {"single_device": quantize_aware_step(bnseq.quantize_aware(make({"momentum": 0.0})))}
    for name, synchronized in (("synchronized", True), ("unsynchronized", False)):
        source = make({"momentum": 0.0, "synchronized": synchronized})
        with strategy.scope():
            results["quantize_aware"][name] = quantize_aware_step(bnseq.quantize_aware(source))

    # A model built in the scope trains, saves, loads, lints and folds.
    with strategy.scope():
        model = make({"synchronized": True})
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "mirrored.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    folded = bnseq.fold(model)
    results["scope"] = {
        "loss_finite": bool(np.isfinite(history.history["loss"]).all()),
        "loaded_classes": [type(layer).__name__ for layer in loaded.layers],
        "classes": [type(layer).__name__ for layer in model.layers],
        "loaded_synchronized": bool(loaded.layers[1].synchronized),
        "loaded_difference": float(np.max(np.abs(loaded.predict(x, verbose=0) - model.predict(x, verbose=0)))),
        "lint": [str(finding) for finding in bnseq.lint(model)],
        "folded_classes": [type(layer).__name__ for layer in folded.layers],
        "fold_difference": float(np.max(np.abs(folded.predict(x, verbose=0) - model.predict(x, verbose=0)))),
    }
    with open(out, "w") as file:
        json.dump(results, file)


def multi_worker(out, mode):
    """A few steps on this worker's own, differently scaled data."""
    import keras

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    rng = np.random.default_rng(index)
    scale = 1.0 + 2.0 * index
    x = (rng.normal(size=(16, 4)) * scale + index).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    arrays = {}
    for name, synchronized in (("synchronized", True), ("unsynchronized", False)):
        with strategy.scope():
            model = make({"momentum": 0.5, "synchronized": synchronized})
            optimizer = keras.optimizers.SGD(0.05)
        if mode == "fit":
            model.compile(optimizer=optimizer, loss="mse")
            dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
            model.fit(dataset.with_options(options), epochs=2, verbose=0)
        else:
            _custom_loop(strategy, model, optimizer, x, y)
        for i, weight in enumerate(model.get_weights()):
            arrays[f"{name}/{i}"] = weight
        stats = statistics(model)
        arrays[f"{name}/moving_mean"] = np.array(stats["moving_mean"])
        arrays[f"{name}/moving_variance"] = np.array(stats["moving_variance"])
    np.savez(out, **arrays)


def recalibrate_across(out):
    """Each worker recalibrates on its own shard (unequal sizes): the statistics of both."""
    import shards

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with strategy.scope():  # batch_normalize's new model is made here too
        model = shards.make()
        np.savez(out, **shards.recalibrate_on_shard(model, index, "MultiWorkerMirroredStrategy"))


def reference(out):
    """One process on all the recalibration data."""
    import shards

    np.savez(out, **shards.reference())


def _custom_loop(strategy, model, optimizer, x, y, steps=4, batch=8):
    """The multi-worker recipe: `strategy.run` on each worker's own batches.

    Keras's `fit` under MultiWorkerMirroredStrategy fails on these versions
    (keras-team/keras#20585); this loop works.
    """
    global_batch = batch * strategy.num_replicas_in_sync

    @tf.function
    def step(inputs, targets):
        def replica_step(inputs, targets):
            with tf.GradientTape() as tape:
                predictions = model(inputs, training=True)
                loss = tf.reduce_sum(tf.square(predictions - targets)) / global_batch
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return loss

        return strategy.run(replica_step, args=(inputs, targets))

    for i in range(steps):
        start = (i * batch) % len(x)
        step(tf.constant(x[start : start + batch]), tf.constant(y[start : start + batch]))


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        mirrored(sys.argv[2])
    elif sys.argv[1] == "reference":
        reference(sys.argv[2])
    elif sys.argv[3] == "recalibrate":
        recalibrate_across(sys.argv[2])
    else:
        multi_worker(sys.argv[2], sys.argv[3])
