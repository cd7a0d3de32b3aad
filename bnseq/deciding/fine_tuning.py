"""What each BatchNormalization will do under `fit`, and lint's fine-tuning rules BN005 to BN008.

`model.summary(show_trainable=True)` shows `trainable`; what `fit` does with a
BatchNormalization also depends on what holds it, on a `training=False` the
graph recorded (overridden by Keras 3.0 to 3.15), and on whether the compiled
train step saw the last change of `trainable`. `mode_of` puts these together
into one `Mode`; the rules report where the user's intent and `fit` disagree:

`BN005`, a recorded `training=False` that this Keras overrides in `fit` (the
transfer-learning guide's `base(x, training=False)`): the statistics train.
Decided by a probe of the installed Keras (`probes`), never by a version
table, so a Keras that keeps the recorded value reports nothing.

`BN006`, `trainable` changed after the train step was compiled or the
optimizer built: on TensorFlow (and JAX) the compiled step still runs the
layer as before; on JAX (or, for a layer unfrozen, any backend) the next
`fit` raises, the optimizer having been built for other variables.

`BN007`, a BatchNormalization that trains inside a model or layer the user
froze otherwise (every other weighted layer in it is frozen).

`BN008`, a training batch of fewer than 8 examples with BatchNormalization
that trains statistics: each step's statistics are those of a few examples.
"""

import dataclasses

import keras

from bnseq import internals
from bnseq import kinds
from bnseq import probes
from bnseq.reading import holding

SMALL_BATCH = 8
ISSUE = "keras-team/keras#20285"


@dataclasses.dataclass(frozen=True)
class Mode:
    """What `fit` does with one BatchNormalization.

    Attributes:
        statistics: bool. Whether `fit` updates its moving statistics.
        affine: bool. Whether `fit` trains its `gamma` and `beta` (False
            when it has neither).
        text: str. The same in words, with the cause.
        overridden: str or None. For BN005: the call whose recorded
            `training=False` this Keras overrides.
        stale: str or None. For BN006: what the compiled train step or the
            optimizer will do instead of what `trainable` says.
    """

    statistics: bool
    affine: bool
    text: str
    overridden: object = None
    stale: object = None


class Context:
    """What the modes of one model's BatchNormalization layers are decided from, read once."""

    def __init__(self, model):
        self.model = model
        self.holders = holding.holders_of(model)
        self.recorded = holding.recorded_inference(model)
        self.compiled = internals.compiled_trainable_state(model) if getattr(model, "compiled", False) else None
        optimizer = getattr(model, "optimizer", None) if getattr(model, "compiled", False) else None
        built = internals.optimizer_built_with(optimizer)
        self.optimizer_variables = None if built is None else {id(variable) for variable in built}
        self.trained = {id(variable) for variable in model.trainable_variables}
        self.train_step = getattr(model, "train_function", None) is not None and not getattr(
            model, "run_eagerly", False
        )


def mode_of(layer, context):
    """The `Mode` of BatchNormalization `layer` of `context.model` under the next `fit`."""
    holders = context.holders.get(id(layer), ())[1:]
    frozen_by = [holder.name for holder in holders if not holder.trainable]
    affine = any(id(variable) in context.trained for variable in (layer.gamma, layer.beta) if variable is not None)
    part = holding.part_held(layer)
    overridden = None
    if not layer.trainable:
        statistics = False
        text = f"frozen: inside {frozen_by[-1]!r} (trainable=False)" if frozen_by else "frozen (trainable=False)"
    elif part == "statistics":
        statistics, text = False, "statistics frozen, gamma and beta train (bnseq.freeze)"
    elif id(layer) in context.recorded:
        by, direct = context.recorded[id(layer)]
        statistics = probes.recorded_training_is_overridden(nested=not direct)
        where = "it was called with" if by == layer.name else f"{by!r} was called with"
        if statistics:
            overridden = by
            text = f"trains statistics: {where} training=False, which Keras {keras.__version__} overrides in fit"
        else:
            text = f"inference: {where} training=False"
    else:
        statistics, text = True, "trains statistics"
    if part == "affine" and statistics:
        text += " (gamma and beta frozen, bnseq.freeze)"
    if frozen_by and layer.trainable and statistics:
        text += f", though it is inside {frozen_by[-1]!r} (trainable=False)"
    stale = _stale(layer, context, affine)
    if stale:
        text = f"{text}; but {stale}"
    return Mode(statistics, affine, text, overridden, stale)


def _stale(layer, context, affine):
    """What the compiled step or the optimizer does against `trainable`, or `None` where they agree."""
    changed = context.compiled is not None and context.compiled.get(id(layer), layer.trainable) != layer.trainable
    variables = [variable for variable in (layer.gamma, layer.beta) if variable is not None]
    unknown = context.optimizer_variables is not None and any(
        id(variable) not in context.optimizer_variables for variable in variables if id(variable) in context.trained
    )
    dropped = context.optimizer_variables is not None and any(
        id(variable) in context.optimizer_variables and id(variable) not in context.trained for variable in variables
    )
    changed = changed or unknown or dropped
    if not changed:
        return None
    backend = keras.backend.backend()
    if unknown or (dropped and backend == "jax"):
        return (
            "the optimizer was built for other variables: the next fit raises ValueError "
            "(call bnseq.freeze or bnseq.unfreeze, which rebuilds it with its state, or compile again)"
        )
    if context.train_step and backend in ("tensorflow", "jax"):
        was = "trains it" if not layer.trainable else "holds it"
        return (
            f"trainable changed after the train step was compiled, which still {was} "
            "(call bnseq.freeze or bnseq.unfreeze, which reset it, or compile again)"
        )
    return None


def findings(model, context=None, *, batch_size=None, finding=None):
    """BN005 to BN008 for every BatchNormalization of `model`, as `finding(code, layer, message)` gives them."""
    context = context or Context(model)
    size = batch_size if batch_size is not None else _fixed_batch(model)
    found = []
    for layer, _ in holding.batch_norms_with_paths(model):
        mode = mode_of(layer, context)
        name = kinds.describe(layer)
        if mode.overridden is not None:
            found.append(
                finding(
                    "BN005",
                    layer,
                    f"{name} trains its statistics in fit although {mode.overridden!r} was called with "
                    f"training=False: Keras {keras.__version__} overrides a recorded training=False when fit "
                    f"calls the model with training=True ({ISSUE}). Freeze it with "
                    f"`bnseq.freeze(model, layers=[{mode.overridden!r}])` (or set its `trainable` to False).",
                )
            )
        if mode.stale is not None:
            found.append(finding("BN006", layer, f"{name}: {mode.stale}."))
        backbone = _frozen_around(layer, context)
        if backbone is not None and mode.statistics:
            found.append(
                finding(
                    "BN007",
                    layer,
                    f"{name} trains in fit inside {kinds.describe(backbone)}, whose other layers are frozen: its "
                    "statistics follow the new data while the layers around it stay as they were. Freeze it too "
                    f"(`bnseq.freeze(model, layers=[{backbone.name!r}])`), unless training only the "
                    "BatchNormalization layers is the plan.",
                )
            )
        if size is not None and size < SMALL_BATCH and mode.statistics:
            found.append(
                finding(
                    "BN008",
                    layer,
                    f"{name} trains its statistics on batches of {size}: the mean and variance of fewer than "
                    f"{SMALL_BATCH} examples are noisy, and each step normalizes by them. Use batches of "
                    f"{SMALL_BATCH} or more, or hold it with `bnseq.freeze` (set exact statistics afterwards "
                    "with `bnseq.recalibrate`).",
                )
            )
    return found


def _frozen_around(layer, context):
    """The innermost model or layer holding `layer` (not the model itself) frozen except for its BatchNormalization."""
    for holder in reversed(context.holders.get(id(layer), ())[1:]):
        if not holder.trainable:
            return holder if layer.trainable else None
        weighted = [
            each
            for each in internals.inner_layers(holder)
            if not isinstance(each, keras.layers.BatchNormalization)
            and not internals.inner_layers(each)
            and each.weights
        ]
        if weighted and not any(each.trainable for each in weighted):
            return holder
    return None


def _fixed_batch(model):
    """The batch size the model's inputs fix, or `None`."""
    try:
        inputs = keras.tree.flatten(model.inputs)
    except (AttributeError, ValueError):
        return None
    sizes = {tensor.shape[0] for tensor in inputs if getattr(tensor, "shape", None) and tensor.shape[0] is not None}
    return min(sizes) if sizes else None
