"""`bnseq.freeze` and `bnseq.unfreeze`: BatchNormalization held still while the rest of a model trains.

Fine-tuning a pretrained backbone wants its BatchNormalization layers in
inference mode: their moving statistics describe the data the backbone was
trained on, and a small fine-tuning set (or a batch of 8) would overwrite them.
Keras 3 has one switch that does this, `layer.trainable = False` (the layer
then normalizes with its moving statistics and nothing of it trains), and two
ways in which the switch, or the guide's alternative, silently does not hold:
a `training=False` recorded in a functional model is overridden by `fit` in
Keras 3.0 to 3.15 (`probes.recorded_training_is_overridden`), and a `trainable`
changed after the model's train step was compiled is not seen by it
(TensorFlow still trains the layer, JAX raises in `fit`).

`freeze` sets the switch and makes it hold: it resets the compiled train
step of a compiled model (the next `fit` compiles it again), and where the
optimizer was built for a different set of variables than the model now
trains (on JAX, or after an `unfreeze`), it builds the optimizer again with
the state of every variable that still trains. A freeze of one part only
(`statistics` without `affine`, or the reverse) has no Keras switch; the layer
becomes a `FrozenBatchNormalization`, Keras's own layer with that part held
(its class is changed in place, so the model, its graph and every reference
to the layer stay as they were), which saves and loads as `.keras` where bnseq
is imported.
"""

import contextlib
import dataclasses
import weakref

import keras
from keras import layers as keras_layers

from bnseq import internals
from bnseq import kinds
from bnseq.reading import holding
from bnseq.reading.holding import affine_held
from bnseq.reading.holding import state
from bnseq.reading.holding import statistics_held

# The state a layer had before bnseq first froze it in this process, for `unfreeze`: (class,
# trainable). Weak keys: a record never keeps a layer alive.
_BEFORE = weakref.WeakKeyDictionary()

PARTS = ("statistics", "affine")


@keras.saving.register_keras_serializable(package="bnseq", name="FrozenBatchNormalization")
class FrozenBatchNormalization(keras_layers.BatchNormalization):
    """A `keras.layers.BatchNormalization` with one part held still, as `bnseq.freeze` leaves it.

    - `frozen="statistics"`: it always normalizes with its moving statistics
      and never updates them, in `fit` as in `predict`; `gamma` and `beta`
      train (torch's `BatchNorm.eval()` with its affine parameters trainable).
    - `frozen="affine"`: `gamma` and `beta` do not train; the statistics are
      updated in training mode as Keras's layer does.

    A layer frozen whole is Keras's own layer with `trainable=False`.

    Args:
        frozen: `"statistics"` or `"affine"`.
        **kwargs: the `keras.layers.BatchNormalization` arguments.
    """

    holds_a_part = True  # how `reading/holding.py` knows the class without importing this floor

    def __init__(self, frozen="statistics", **kwargs):
        self.frozen = _checked_part(frozen)
        super().__init__(**kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        self._hold()

    @property
    def trainable(self):
        return keras_layers.BatchNormalization.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        keras_layers.BatchNormalization.trainable.fset(self, value)
        self._hold()  # `model.trainable = True` must not release gamma and beta of an affine freeze

    def _hold(self):
        if getattr(self, "frozen", None) == "affine":
            for variable in (self.gamma, self.beta):
                if variable is not None:
                    variable.trainable = False

    def call(self, inputs, training=None, mask=None):
        if self.frozen == "statistics":
            training = False
        return super().call(inputs, training=training, mask=mask)

    def get_config(self):
        config = super().get_config()
        config["frozen"] = self.frozen
        return config


@dataclasses.dataclass(frozen=True)
class Frozen:
    """What `freeze` or `unfreeze` did to one BatchNormalization.

    Attributes:
        batch_norm: str. The layer's name.
        path: str. Where it is: the names of the models and layers that
            hold it, outermost first, then its own, joined by `/`.
        statistics: bool. Whether its moving statistics are now held.
        affine: bool. Whether its `gamma` and `beta` are now held.
        before: str. Its state before the call, in the words of `state`.
        note: str. Anything that keeps the new state from being all there is
            to it (a frozen container around it), or `""`.
    """

    batch_norm: str
    path: str
    statistics: bool
    affine: bool
    before: str
    note: str = ""


class FreezeReport(list):
    """A list of `Frozen`, one per BatchNormalization the call changed or checked, that prints as a table.

    Attributes:
        rebuilt: tuple of str. What of the compiled model was made again:
            `"train step"` (the next `fit` compiles it anew) and
            `"optimizer"` (`model.optimizer` is a new optimizer of the same
            configuration, holding the old one's state for every variable
            that still trains; a reference kept to the old one no longer
            trains this model).
    """

    def __init__(self, rows=(), rebuilt=()):
        super().__init__(rows)
        self.rebuilt = tuple(rebuilt)

    def __str__(self):
        if not self:
            return "No BatchNormalization changed."
        header = ("BatchNormalization", "statistics", "gamma/beta", "before", "note")
        body = [
            (row.path, "held" if row.statistics else "trains", "held" if row.affine else "train", row.before, row.note)
            for row in self
        ]
        widths = [max(len(line[index]) for line in [header, *body]) for index in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
        if self.rebuilt:
            lines.append(f"Rebuilt for the next fit: {', '.join(self.rebuilt)}.")
        return "\n".join(lines)


def freeze(model, *, statistics=True, affine=True, layers=None):
    """Holds BatchNormalization layers still in `fit` while the rest of the model trains.

    After it, the next `fit` (or `train_on_batch`) leaves each frozen layer's
    moving statistics, and with `affine=True` its `gamma` and `beta`, exactly
    as they were, bit for bit, on every backend: also where the layer was
    called with `training=False` that this Keras overrides in `fit`, and
    whether the model was compiled or trained before. For a compiled model
    the compiled train step is reset, and where the optimizer was built for
    other variables (JAX) it is built again with its state kept (see
    `FreezeReport.rebuilt`); nothing has to be compiled again. Pass the model
    that is compiled: freezing a backbone on its own cannot reach the train
    step of the model around it.

    - `statistics=True, affine=True`: Keras's own freeze,
      `layer.trainable = False`: the layer runs in inference mode and none
      of it trains. The model saves and loads as `.keras` anywhere.
    - `statistics=True, affine=False`: the layer normalizes with its moving
      statistics and never updates them, while `gamma` and `beta` train.
    - `statistics=False, affine=True`: `gamma` and `beta` are held; the
      statistics keep following the training batches.

    The last two become a `bnseq.FrozenBatchNormalization` in place (the
    same object, its class changed), which needs `import bnseq` to load.

    Args:
        model: `keras.Model`. Nested models and BatchNormalization inside
            subclassed layers are reached.
        statistics: bool. Hold the moving mean and variance.
        affine: bool. Hold `gamma` and `beta`.
        layers: which BatchNormalization layers: `None` for all of them, or
            a layer, a layer name, or a list of them; a model or layer that
            holds BatchNormalization layers stands for all it holds.

    Returns:
        `FreezeReport`, one row per BatchNormalization.

    Raises:
        TypeError: if `model` is not a Keras model, or an item of `layers`
            is neither a layer nor a name.
        ValueError: if `statistics` and `affine` are both `False`, a name
            matches no layer (or several), an item holds no
            BatchNormalization, or a partial freeze meets a subclass of
            BatchNormalization it cannot hold. Nothing is changed then.

    Examples:
        >>> model = keras.Sequential([
        ...     keras.Input((3,)),
        ...     keras.layers.Dense(4, use_bias=False),
        ...     keras.layers.BatchNormalization(name="bn"),
        ... ])
        >>> report = bnseq.freeze(model)
        >>> model.get_layer("bn").trainable, [row.before for row in report]
        (False, ['trains'])
    """
    _check_model(model, "freeze")
    for name, value in (("statistics", statistics), ("affine", affine)):
        if not isinstance(value, bool):
            raise TypeError(f"freeze: `{name}` must be True or False. Received: {name}={value!r}")
    if not (statistics or affine):
        raise ValueError(
            "freeze: statistics=False and affine=False hold nothing. To let every BatchNormalization train "
            "again, call bnseq.unfreeze(model)."
        )
    chosen = _chosen(model, layers, "freeze")
    if not affine or not statistics:
        for layer, _ in chosen:
            if type(layer) not in (keras_layers.BatchNormalization, FrozenBatchNormalization):
                raise ValueError(
                    f"freeze cannot hold only the {'statistics' if statistics else 'affine parameters'} of "
                    f"{kinds.describe(layer)}: it is a {type(layer).__name__}, a subclass of BatchNormalization "
                    "whose call() bnseq does not know. Freeze it whole (statistics=True, affine=True), which "
                    "sets its trainable to False."
                )
    target = "statistics" if statistics and not affine else "affine" if affine and not statistics else None
    return _apply(model, chosen, _freezer(target))


def unfreeze(model, *, layers=None):
    """Lets BatchNormalization layers train again: undoes `freeze`.

    A layer that `freeze` froze in this process returns to the state it had
    before (a layer that was `trainable=False` already stays so); any other
    frozen BatchNormalization (`trainable=False`, or a
    `FrozenBatchNormalization` loaded from a file) becomes Keras's own
    layer, trainable. A layer inside a model or layer whose own `trainable`
    is `False` stays frozen with it, and its row says so. A compiled
    model's train step and optimizer are made ready as by `freeze`.

    Args:
        model: `keras.Model`.
        layers: as for `freeze`.

    Returns:
        `FreezeReport`.

    Raises:
        TypeError, ValueError: as `freeze`, for `layers`. Nothing is
            changed then.
    """
    _check_model(model, "unfreeze")
    chosen = _chosen(model, layers, "unfreeze")
    return _apply(model, chosen, _release)


def _apply(model, chosen, change):
    """Change each chosen layer, make a compiled model ready for it; undo everything if that fails."""
    holders = holding.holders_of(model)
    kept = [(layer, type(layer), layer.trainable, getattr(layer, "frozen", None)) for layer, _ in chosen]
    records = {id(layer): _BEFORE.get(layer) for layer, _ in chosen}
    rows = []
    try:
        for layer, path in chosen:
            before = state(layer)
            frozen_holders = [holder.name for holder in holders.get(id(layer), ())[1:] if not holder.trainable]
            note = change(layer, frozen_holders)
            rows.append(
                Frozen(layer.name, "/".join(path), statistics_held(layer), affine_held(layer), before, note or "")
            )
        rebuilt = _make_ready(model)
    except Exception:
        for layer, kind, trainable, frozen in kept:
            _become(layer, kind, trainable, frozen)
            if records[id(layer)] is None:
                _BEFORE.pop(layer, None)
            else:
                _BEFORE[layer] = records[id(layer)]
        raise
    return FreezeReport(rows, rebuilt)


def _freezer(target):
    """The change `freeze` makes: the whole layer (`target=None`), or only its `"statistics"` or `"affine"`."""

    def change(layer, frozen_holders):
        _BEFORE.setdefault(layer, (type(layer), layer.trainable, getattr(layer, "frozen", None)))
        if target is None:
            _become(layer, _keras_class(layer), False)
            return ""
        _become(layer, FrozenBatchNormalization, True, target)
        if frozen_holders:
            return (
                f"inside {frozen_holders[-1]!r}, which is frozen (trainable=False): its gamma and beta train only "
                "once that is unfrozen"
            )
        return ""

    return change


def _release(layer, frozen_holders):
    """The change `unfreeze` makes: the state before bnseq froze it, or Keras's layer, trainable."""
    if frozen_holders:
        return f"left frozen: it is inside {frozen_holders[-1]!r}, which is frozen (trainable=False)"
    kind, trainable, frozen = _BEFORE.pop(layer, (_keras_class(layer), True, None))
    _become(layer, kind, trainable, frozen)
    return ""


def _become(layer, kind, trainable, frozen=None):
    """Give `layer` class `kind`, `trainable` and (for a `FrozenBatchNormalization`) the part it holds."""
    if type(layer) is not kind:
        layer.__class__ = kind
    if kind is FrozenBatchNormalization:
        layer.frozen = frozen
    else:
        layer.__dict__.pop("frozen", None)
    # Keras's setter sets gamma's and beta's `trainable` with the layer's; an affine freeze then holds them.
    # Called directly: TensorFlow's attribute tracking skips an assignment of the value already there.
    keras.Layer.trainable.fset(layer, trainable)
    if kind is FrozenBatchNormalization:
        layer._hold()


def hold_like(source, target):
    """Give `target`, a new BatchNormalization taking `source`'s place, the freeze `source` has.

    A rewrite (`batch_normalize`) that takes a user's frozen layer over must
    not silently let it train again.
    """
    part = holding.part_held(source)
    if part is not None and type(target) is keras_layers.BatchNormalization:
        _become(target, FrozenBatchNormalization, source.trainable, part)
    elif not source.trainable:
        keras.Layer.trainable.fset(target, False)


def _keras_class(layer):
    """The class a layer frozen whole has: its own, or Keras's for a `FrozenBatchNormalization`."""
    return keras_layers.BatchNormalization if isinstance(layer, FrozenBatchNormalization) else type(layer)


def _make_ready(model):
    """Make a compiled model's next `fit` see the layers' new state; what was rebuilt."""
    if not getattr(model, "compiled", False):
        return ()
    rebuilt = []
    if getattr(model, "train_function", None) is not None:
        model.train_function = None  # the next fit compiles it with the new trainable state
        rebuilt.append("train step")
    optimizer = getattr(model, "optimizer", None)
    built_with = internals.optimizer_built_with(optimizer)
    if built_with is not None:
        trained = model.trainable_variables
        known = {id(variable) for variable in built_with}
        new = [variable for variable in trained if id(variable) not in known]
        # TensorFlow and PyTorch optimizers update any subset of what they were built with; a JAX train
        # step hands the optimizer exactly the variables it was built with, and none takes a new one.
        if new or (keras.backend.backend() == "jax" and len(trained) != len(known)):
            model.optimizer = rebuilt_optimizer(model, optimizer, trained)
            rebuilt.append("optimizer")
    internals.note_trainable_state_compiled(model)
    return tuple(rebuilt)


def rebuilt_optimizer(model, optimizer, variables):
    """A new optimizer of `optimizer`'s configuration built for `variables`, with its state carried over.

    Every optimizer variable (the step count, the learning rate, each
    variable's slots such as Adam's moments) is copied from the optimizer
    variable of the same path: Keras names a slot after the model variable
    it belongs to, so the state of every variable that still trains moves
    with it, and a variable new to the optimizer starts fresh, as it would
    in a new `compile`.
    """
    strategy = getattr(model, "distribute_strategy", None) if keras.backend.backend() == "tensorflow" else None
    with strategy.scope() if strategy is not None else contextlib.nullcontext():  # variables where the model's are
        fresh = type(optimizer).from_config(optimizer.get_config())
        fresh.build(variables)
    old = {}
    for variable in optimizer.variables:
        old.setdefault(variable.path, []).append(variable)
    for variable in fresh.variables:
        same = old.get(variable.path, [])
        if len(same) > 1:
            raise ValueError(
                f"bnseq cannot carry the state of {type(optimizer).__name__} over to the variables the model now "
                f"trains: two of its variables are both named {variable.path!r}. Compile the model again "
                "(`model.compile(...)`) after freeze, which starts the optimizer afresh."
            )
        if same and tuple(same[0].shape) == tuple(variable.shape):
            variable.assign(same[0])
    return fresh


def _chosen(model, layers, function):
    """The BatchNormalization layers `layers` names in `model`, with their paths; checked before any change."""
    everything = holding.batch_norms_with_paths(model)
    if layers is None:
        return everything
    items = layers if isinstance(layers, (list, tuple)) else [layers]
    inside = internals.inner_layers(model)
    wanted = set()
    for item in items:
        if isinstance(item, str):
            named = [layer for layer in [model, *inside] if layer.name == item]
            unique = list({id(layer): layer for layer in named}.values())
            if not unique:
                raise ValueError(
                    f"{function}: model {model.name!r} has no layer named {item!r}. Its BatchNormalization "
                    f"layers: {_listed(layer.name for layer, _ in everything)}."
                )
            if len(unique) > 1:
                raise ValueError(
                    f"{function}: {len(unique)} layers of model {model.name!r} are named {item!r}; pass the layer "
                    "object itself in `layers=`."
                )
            item = unique[0]
        elif not isinstance(item, keras.Layer):
            raise TypeError(
                f"{function}: `layers` takes layers and layer names. Received: {item!r} "
                f"(of type {type(item).__name__})"
            )
        elif item is not model and not any(item is layer for layer in inside):
            raise ValueError(f"{function}: {kinds.describe(item)} is not a layer of model {model.name!r}.")
        held = [item] if isinstance(item, keras_layers.BatchNormalization) else internals.inner_layers(item)
        held = [layer for layer in held if isinstance(layer, keras_layers.BatchNormalization)]
        if not held:
            raise ValueError(
                f"{function}: {kinds.describe(item)} is not a BatchNormalization and holds none. "
                f"The model's BatchNormalization layers: {_listed(layer.name for layer, _ in everything)}."
            )
        wanted.update(id(layer) for layer in held)
    return [(layer, path) for layer, path in everything if id(layer) in wanted]


def _listed(names, limit=8):
    names = [repr(name) for name in names]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) or "none") + more


def _check_model(model, function):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{function} expects a keras.Model. Received: model={model!r} (of type {type(model).__name__})"
        )


def _checked_part(frozen):
    if frozen not in PARTS:
        raise ValueError(f"FrozenBatchNormalization: `frozen` is 'statistics' or 'affine'. Received: {frozen!r}")
    return frozen
