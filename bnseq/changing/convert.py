"""`bnseq.batch_normalize`: rewrite any model into the normalized form (a plan for `rewrite.apply`)."""

import os

import keras
import numpy as np

from bnseq import kinds
from bnseq import notices
from bnseq import probes
from bnseq.changing import freezing
from bnseq.changing import rewrite
from bnseq.changing.sequential import Sequential
from bnseq.deciding import fold_math
from bnseq.deciding import fold_plan
from bnseq.deciding import rules
from bnseq.reading import files
from bnseq.reading import graph as graph_module
from bnseq.statistics import collective
from bnseq.statistics import data as data_module
from bnseq.statistics import segments


def batch_normalize(model, batch_norm=True, *, data=None, batch_size=None, steps=None, safe_mode=True):
    """Returns a new model with batch normalization in the right place.

    Every linear layer (`Dense`, the convolutions and their transposed,
    depthwise and separable forms) becomes the unit bnseq writes: the layer
    without bias and with the identity activation, a BatchNormalization on its
    channel axis, then the activation. A BatchNormalization that already sits
    right after a linear layer (or after its activation layer) becomes that
    layer's normalization, moved before the activation, with its options and
    name kept, never a second one. Models nested inside the model are
    rewritten the same way.

    Weights: each rewritten linear layer is a new layer holding the original's
    kernel (its bias goes); each BatchNormalization it gets is new (moving mean
    0, variance 1, so outputs change until it is trained). A taken-over
    BatchNormalization keeps its weights, its moving mean moved by the bias
    that went (`BN(Wx + b)` with mean `m` is `BN(Wx)` with mean `m - b`), so
    where it sat right after the linear layer it computes what it did. Every
    other layer is not copied: the result holds the same layer objects as the
    original (a `Lambda`, a custom layer, a BatchNormalization it cannot
    place), as two functional models built on one layer do, so their weights
    are shared. A linear layer bnseq cannot re-create from its config without
    risk (a subclass, a quantized or LoRA layer) is kept as it is, with a
    warning. The original model is not changed. `lint()` of the result finds
    no wasted bias and nothing the original did not have; a BatchNormalization
    that follows no linear layer (after a merge, after another
    BatchNormalization) stays where it is, and lint still reports it.
    `batch_normalize` of the result gives the same structure again.

    With `data`, the result computes in inference exactly what `model`
    computes (in exact arithmetic; in float32 to about 1e-6 relative), so
    training can go on from there: each new BatchNormalization is calibrated
    on `data` (its moving mean `m` and variance `v` are those of its input,
    see `bnseq.recalibrate`) and given `gamma = sqrt(v + epsilon)` and
    `beta = m + bias`, with the bias its linear layer had. At inference it then
    gives back `x + bias`, whatever `m` and `v` are, so all of them are
    measured in one pass over `data`; in training its batch statistics are
    close to `m` and `v`, so the first steps start from the trained model.
    A BatchNormalization the original applies after an activation is, at
    inference, an affine map `s * a + t` of the activation's output; it moves
    before the activation as a new, calibrated one, and its map folds forward
    into the linear layer that alone takes its output (`W' = diag(s) W`,
    `b' = b + t W`: exact for Dense, depthwise and plain convolutions that do
    not pad). Where it cannot (its output goes elsewhere, or into a
    convolution that zero-pads), `data=` raises, naming the layers.

    Args:
        model: `keras.Model`. Sequential (from Keras or bnseq) or functional
            (built from inputs and outputs, subclasses such as keras-hub
            backbones included), or the path of a `.keras` file.
        batch_norm: bool or dict. `True`, or a dict of
            `keras.layers.BatchNormalization` arguments for the
            normalizations this adds (those already in the model keep theirs).
        data: optional. Data the model takes, as for `bnseq.recalibrate`
            (arrays, a `tf.data.Dataset`, a `PyDataset`, batches), to keep
            the model's predictions. In a multi-process run (as
            `bnseq.recalibrate` describes; on TensorFlow, called inside the
            `MultiWorkerMirroredStrategy` scope) each process passes its own
            shard, the statistics are pooled over all of them, and every
            process gets the same model.
        batch_size: int, optional. For array `data` (default 32).
        steps: int, optional. Use only the first `steps` batches of `data`.
        safe_mode: bool. Keras's `safe_mode` for loading a file: `False` for
            a trusted file with `Lambda` layers.

    Returns:
        A `bnseq.Sequential` with this `batch_norm` for a Sequential model; a
        plain functional `keras.Model` with the same inputs and outputs for a
        functional one. Where the model holds a subclassed layer that traces
        (or is a subclassed model that traces), its `call()` is inlined and
        the result is one functional `keras.Model`, for a Sequential model
        too.

    Raises:
        TypeError: if `model` is a subclassed model whose `call()` does not
            trace (the message says why), or `batch_norm` has the wrong type.
        ValueError: if `batch_norm` is `False` or has invalid options; with
            `data`, if the model is not built or a BatchNormalization's
            output cannot be kept (see above).

    Examples:
        >>> inputs = keras.Input((8,))
        >>> x = keras.layers.Dense(16, activation="relu")(inputs)
        >>> x = keras.layers.BatchNormalization()(x)   # after the activation
        >>> model = keras.Model(inputs, keras.layers.Dense(1)(x))
        >>> fixed = bnseq.batch_normalize(model)
        >>> [type(layer).__name__ for layer in fixed.layers]
        ['InputLayer', 'Dense', 'BatchNormalization', 'Activation', 'Dense', \
'BatchNormalization']
        >>> bnseq.lint(fixed)
        []
    """
    options = rules.check_batch_norm(batch_norm)
    if options is False:
        raise ValueError(
            "batch_normalize(batch_norm=False) would change nothing. Pass True "
            "or a dict of BatchNormalization options. Received: batch_norm=False"
        )
    if not isinstance(model, (keras.Model, str, os.PathLike)):
        raise TypeError(
            "batch_normalize expects a keras.Model or the path of a .keras file. "
            f"Received: model={model!r} (of type {type(model).__name__})"
        )
    model = files.as_model(model, safe_mode=safe_mode)
    if data is not None and not model.built:
        raise ValueError(
            f"batch_normalize(data=...) keeps the predictions of a trained model, but "
            f"{type(model).__name__} '{model.name}' is not built. Build and train it first, "
            "or leave `data` out."
        )
    graph = graph_module.walk(model)
    plan, finish = _plan(graph, options, batch_norm, keep=data is not None, model_name=model.name)
    result = rewrite.apply(model, plan, graph.flat)
    finish(result, data_module.batches_of(data, batch_size, steps, model) if data is not None else None)
    return result


def _plan(graph, options, batch_norm, keep, model_name):
    """The rewrite (each linear layer replaced by its unit, taken-over BNs dropped) and how to finish it.

    Returns:
        (`rewrite.Plan`, finish): `finish(result, batches)` sets the weights
        that keep the predictions, once the result is built (`batches` is
        `None` without data).
    """

    def sequential(model, tensor, layers, unit_sizes):
        return Sequential._assemble(
            layers, unit_sizes, tensor, name=model.name, trainable=model.trainable, batch_norm=batch_norm
        )

    plan = rewrite.Plan("batch_normalize", sequential)
    copies, originals = {}, {}  # id(original linear layer) -> its copy, and the layer
    inserted = []  # (new BatchNormalization, the original linear layer before it): calibrated on data
    corrected = []  # (taken-over BatchNormalization, its new one, the original linear layer)
    forward = []  # (BatchNormalization after an activation, the linear layer it folds forward into)
    taken = {layer.name for layer in graph.layers}
    for layer in graph.layers:
        if not kinds.is_linear(layer):
            continue
        why = kinds.why_not_copied(layer)
        if why is not None:
            notices.warn(
                f"batch_normalize keeps {kinds.describe(layer)} as it is, without BatchNormalization: {why}. "
                "Normalize it by hand (use_bias=False, BatchNormalization, then the activation)."
            )
            continue
        existing, after_activation = _existing_batch_norm(graph, layer)
        name = None
        layer_options = options
        if existing is not None:
            plan.drop.add(id(existing))
            taken.discard(existing.name)
            layer_options, name = rewrite.batch_norm_options(existing), existing.name
        unit, carry = rewrite.normalized_copy(layer, layer_options, taken, batch_norm_name=name)
        for message in unit.warnings:
            notices.warn(message)
        copies[id(layer)], originals[id(layer)] = unit.layers[0], layer
        plan.replace[id(layer)] = unit.layers
        plan.finish.append(carry)
        new_bn = unit.layers[1]
        if existing is None:
            inserted.append((new_bn, layer))
        elif after_activation:
            # Its affine map acts after the activation: moving it before the activation keeps the
            # predictions only if the map folds forward into the next linear layer.
            plan.finish.append(lambda source=existing, target=new_bn: _carry_weights(source, target))
            if keep:
                target, why_not = fold_plan.forward_target(graph, existing)
                if target is None or kinds.why_not_copied(target) is not None:
                    why_not = why_not or (
                        "its output does not go to one linear layer alone"
                        if target is None
                        else f"{kinds.describe(target)} cannot be re-created"
                    )
                    raise ValueError(
                        f"batch_normalize(data=...) cannot keep the predictions of model "
                        f"'{model_name}': {kinds.describe(existing)} normalizes the output of the "
                        f"activation of {kinds.describe(layer)}, and moving it before the activation loses the "
                        f"affine map it applies there, which cannot fold forward into the layer after it "
                        f"({why_not}). Leave `data` out (the model is rewritten, its new statistics start "
                        "afresh), or place that BatchNormalization before the activation yourself."
                    )
                forward.append((existing, target))
                inserted.append((new_bn, layer))
        else:
            shape = graph.output_shape(layer)
            rank = len(shape) if shape is not None else kinds.output_rank(layer)
            if keep and not kinds.same_axis(existing.axis, kinds.channel_axis(layer), rank):
                raise ValueError(
                    f"batch_normalize(data=...) cannot keep the predictions of model '{model_name}': "
                    f"{kinds.describe(existing)} normalizes axis {existing.axis}, not the channel axis "
                    f"{kinds.channel_axis(layer)} of {kinds.describe(layer)}, so its statistics do not carry "
                    "over to the BatchNormalization that replaces it. Leave `data` out, or fix its axis first."
                )
            plan.finish.append(lambda source=existing, target=new_bn: _carry_weights(source, target))
            corrected.append((existing, new_bn, layer))

    def finish(result, batches):
        biases = {key: _bias_of(layer) for key, layer in originals.items()}
        for bn, target in forward:
            copy = copies[id(target)]
            scale, shift = fold_math.affine_of(bn)
            kernel, bias = fold_math.forward_folded_weights(target, scale, shift, bias=biases[id(target)])
            copy.kernel.assign(kernel.astype(keras.backend.standardize_dtype(copy.kernel.dtype)))
            biases[id(target)] = bias
        for existing, new_bn, layer in corrected:
            if existing.built and _same_shapes(existing, new_bn):  # unbuilt: no statistics to carry yet
                # BN(Wx + b) with mean m is BN(Wx) with mean m - b: the taken-over layer keeps its output.
                mean = keras.ops.convert_to_numpy(existing.moving_mean).astype(np.float64) - biases[id(layer)]
                new_bn.moving_mean.assign(mean.astype(keras.backend.standardize_dtype(new_bn.moving_mean.dtype)))
        if batches is not None:
            _keep_predictions(result, [(bn, biases[id(layer)]) for bn, layer in inserted], batches)

    return plan, finish


def _keep_predictions(model, inserted, batches):
    """Calibrate each inserted BatchNormalization so that it gives back `x + bias`.

    In a multi-process run (collective.py) each process passes its own shard
    and the statistics are pooled over all of them, so every process ends
    with the same model.
    """
    processes = collective.processes_of(model)
    with collective.failures_shared(processes):  # the other processes are told, and stop too
        if not batches:
            raise ValueError("batch_normalize(data=...) needs data with at least one batch.")
        # With gamma = sqrt(v + eps) and beta = m + bias, a BatchNormalization gives
        # x + bias in inference for any moving m and v: first make every inserted one
        # do so with its initial statistics, then one pass measures them all.
        for bn, bias in inserted:
            _set_affine(bn, bias)
    with probes.unchanged(model):  # running the data moves nothing (a stateful RNN, a counter in a call())
        stats = segments.measure(
            model, batches, [bn for bn, _ in inserted], chained=False, processes=processes
        ).stats
    for bn, bias in inserted:
        stats[id(bn)].assign_to(bn)
        _set_affine(bn, bias)


def _set_affine(bn, bias):
    """Make `bn` give back `x + bias` in inference, keeping as much of its moving statistics as it can.

    With `gamma = sqrt(v + epsilon)` and `beta = m + bias` it does for any
    statistics `m`, `v`. Without a `gamma` (`scale=False`) the variance is
    set to `1 - epsilon` instead; without a `beta` (`center=False`) the mean
    is set to `-bias`: the output is the same, and `fit` measures them anew.
    """
    mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
    variance = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
    if not bn.scale:
        if not bn.epsilon < 1.0:
            raise ValueError(
                f"batch_normalize(data=...) cannot keep the predictions through {kinds.describe(bn)}: it has "
                f"scale=False and epsilon={bn.epsilon} >= 1, so it always divides by more than 1. Use a smaller "
                "epsilon or scale=True."
            )
        variance = np.full_like(variance, 1.0 - bn.epsilon)
        bn.moving_variance.assign(variance.astype(keras.backend.standardize_dtype(bn.moving_variance.dtype)))
    if not bn.center:
        mean = np.broadcast_to(-np.asarray(bias, np.float64), mean.shape).copy()
        bn.moving_mean.assign(mean.astype(keras.backend.standardize_dtype(bn.moving_mean.dtype)))
    if bn.scale:
        bn.gamma.assign(np.sqrt(variance + bn.epsilon).astype(bn.gamma.dtype))
    if bn.center:
        bn.beta.assign((mean + bias).astype(bn.beta.dtype))


def _bias_of(layer):
    """The bias a linear layer adds, as float64 (zeros when it has none)."""
    if not (layer.use_bias and layer.built):
        return 0.0
    return keras.ops.convert_to_numpy(layer.bias).astype(np.float64)


def _same_shapes(source, target):
    return [tuple(w.shape) for w in source.weights] == [tuple(w.shape) for w in target.weights]


def _carry_weights(source, target):
    """A taken-over BatchNormalization keeps its weights (where their shapes still fit) and its freeze."""
    if _same_shapes(source, target):
        for original, new in zip(source.weights, target.weights):
            new.assign(keras.ops.convert_to_numpy(original))  # a copy: see rewrite.normalized_copy
    freezing.hold_like(source, target)


def _existing_batch_norm(graph, layer):
    """The BatchNormalization right after `layer` that can become its own, and whether it follows an activation.

    Either `layer -> BatchNormalization` (after the layer's own activation,
    if it has one), or, when the layer's own activation is the identity,
    `layer -> activation layer -> BatchNormalization`; each step the only
    user of the one before, all in the same model, the BatchNormalization
    called once (one shared by several layers stays theirs, as it is).
    `(None, False)` if none.
    """
    parent = graph.parents.get(id(layer))
    step = layer
    for _ in range(2):
        consumers = graph.consumers(step)
        if len(consumers) != 1 or not graph.feeds_only(step, consumers[0]):
            return None, False
        (following,) = consumers
        if graph.parents.get(id(following)) is not parent:
            return None, False
        if isinstance(following, keras.layers.BatchNormalization):
            if graph.calls_of(following) != 1:  # shared by several layers: it cannot become one's own
                return None, False
            return following, step is not layer or not kinds.is_identity(layer.activation)
        if step is not layer or not isinstance(following, kinds.ACTIVATION_LAYERS):
            return None, False
        if not kinds.is_identity(layer.activation):
            return None, False
        step = following
    return None, False
