"""`bnseq.callbacks`: exact BatchNormalization statistics while `fit` trains."""

import collections.abc

import keras

from bnseq.reading import holding
from bnseq.statistics import data as data_module
from bnseq.statistics import recalibration


class Recalibrate(keras.callbacks.Callback):
    """Recalibrates every BatchNormalization inside `fit`: before each validation and at the end.

    A BatchNormalization's moving statistics average the batches of the
    last few hundred steps (Keras's default `momentum=0.99`), computed with
    weights that have changed since; early in training, or with a high
    learning rate, they do not describe the model being validated, and
    validation accuracy lags far behind training accuracy for that reason
    alone. This callback calls `bnseq.recalibrate(model, data)` after an
    epoch's training and before its validation (so `val_` metrics,
    `ModelCheckpoint` and `EarlyStopping` see exact statistics), and once
    more at the end of training: the model `fit` returns has them. Training
    then continues from the recalibrated statistics, as detectron2's
    PreciseBN hook does.

    Under a distribution the recalibration runs there too: under a
    `tf.distribute` strategy or a `keras.distribution` (and, across
    processes, each process passes its own shard as `data`: see
    `bnseq.recalibrate`).

    Cost: one `bnseq.recalibrate` over `data` per call (about one forward
    pass over it), at most once per epoch plus once at the end; `steps`
    bounds it.

    Args:
        data: what `bnseq.recalibrate` takes: arrays, a `tf.data.Dataset`,
            a `keras.utils.PyDataset` or an iterable of batches; usually
            (a sample of) the training inputs, without augmentation. It is
            read at every recalibration, so a generator (or any one-shot
            iterator, used up by the first) is refused unless `steps` is
            given: then its first `steps` batches are read once, here, and
            used every time.
        batch_size: int, optional. For arrays: the batch size (default 32).
        steps: int, optional. Use only the first `steps` batches of `data`.
        frequency: `"epoch"` or int. `"epoch"` recalibrates after every
            epoch; an int `n` after every `n`-th epoch (the first `n - 1`
            validations then see the moving statistics).
        cache_limit: int or `"auto"`, as `bnseq.recalibrate` takes it.
        include_frozen: bool, as `bnseq.recalibrate` takes it: by default a
            BatchNormalization frozen for fine-tuning (`bnseq.freeze`,
            `trainable=False`) keeps its statistics. If every one is frozen,
            `fit` is refused before its first step.

    Attributes:
        reports: list of `(epoch, RecalibrationReport)`, one per
            recalibration; `epoch` counts from 0, and is `None` for the one
            at the end of training.

    Examples:
        >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
        >>> y = x.sum(axis=1, keepdims=True)
        >>> model = bnseq.Sequential(
        ...     [keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)],
        ...     batch_norm=True)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> callback = bnseq.callbacks.Recalibrate(x, batch_size=32)
        >>> history = model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[callback])
        >>> [epoch for epoch, _ in callback.reports]  # before each validation; none left at the end
        [0, 1]
    """

    def __init__(
        self, data, *, batch_size=None, steps=None, frequency="epoch", cache_limit="auto", include_frozen=False
    ):
        super().__init__()
        data_module.check_batching(batch_size, steps)
        data_module.check_data(data)
        if isinstance(data, collections.abc.Iterator):
            if steps is None:
                raise TypeError(
                    f"Recalibrate reads its data at every epoch, and a {type(data).__name__} is used up by the "
                    "first. Pass data that can be read again (arrays, a tf.data.Dataset, a "
                    "keras.utils.PyDataset, a list of batches), or steps=N to read N batches from it now and "
                    f"use them at every recalibration. Received: data={data!r}"
                )
            data = data_module.batches_of(data, batch_size, steps)
        if frequency != "epoch" and (
            isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1
        ):
            raise ValueError(
                f"`frequency` must be 'epoch' or a positive int (every that many epochs). Received: "
                f"frequency={frequency!r}"
            )
        self.data, self.batch_size, self.steps = data, batch_size, steps
        if not isinstance(include_frozen, bool):
            raise TypeError(f"Recalibrate: `include_frozen` must be True or False. Received: {include_frozen!r}")
        self.frequency, self.cache_limit, self.include_frozen = frequency, cache_limit, include_frozen
        self.reports = []
        self._fitting, self._trained, self._epoch = False, False, None

    def on_train_begin(self, logs=None):
        if not self.include_frozen:
            layers = [layer for layer, _ in holding.batch_norms_with_paths(self.model)]
            if layers and all(holding.statistics_held(layer) for layer in layers):
                raise ValueError(
                    f"Recalibrate: every BatchNormalization of model {self.model.name!r} has frozen statistics "
                    "(trainable=False or bnseq.freeze), so the callback would have nothing to set. Pass "
                    "include_frozen=True to recalibrate them anyway, or leave the callback out."
                )
        self._fitting, self._trained, self._epoch = True, False, None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._trained = True

    def on_test_begin(self, logs=None):
        # Inside fit, validation runs between an epoch's training and `on_epoch_end`.
        if self._fitting and self._due(self._epoch):
            self._recalibrate(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self._due(epoch):  # an epoch without validation
            self._recalibrate(epoch)

    def on_train_end(self, logs=None):
        self._recalibrate(None)
        self._fitting = False

    def _due(self, epoch):
        return epoch is not None and (self.frequency == "epoch" or (epoch + 1) % self.frequency == 0)

    def _recalibrate(self, epoch):
        if not self._trained:  # nothing changed since the last one
            return
        report = recalibration.recalibrate(
            self.model,
            self.data,
            batch_size=self.batch_size,
            steps=self.steps,
            verbose=0,
            cache_limit=self.cache_limit,
            include_frozen=self.include_frozen,
        )
        self.reports.append((epoch, report))
        self._trained = False
