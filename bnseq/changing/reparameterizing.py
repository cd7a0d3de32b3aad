"""`bnseq.reparameterize`: sums of parallel conv + BatchNormalization branches become one convolution.

The decisions and the math live in `deciding/branches.py`; here each merged
sum becomes a new convolution (with a `ZeroPadding` layer before it where
its padding is neither `"valid"` nor `"same"`), built from the config of the
branch with the largest kernel, and `rewrite.apply` carries every other layer
over as the same object.
"""


import keras

from bnseq.changing import rewrite
from bnseq.deciding import branches as branches_module
from bnseq.reading import files
from bnseq.reading import graph as graph_module

_PADDING_LAYERS = {1: keras.layers.ZeroPadding1D, 2: keras.layers.ZeroPadding2D, 3: keras.layers.ZeroPadding3D}


def reparameterize(model, *, strict=False, safe_mode=True):
    """Merges summed parallel branches of conv + BatchNormalization into one convolution, for inference.

    RepVGG, MobileOne and keras-hub's D-FINE train blocks that add up several
    branches of one input: a k x k convolution with its BatchNormalization,
    a 1 x 1 one with its own, a BatchNormalization alone, the input itself.
    At inference each is an affine map of the input, and so is their sum:
    one k x k convolution with a bias. `reparameterize` returns a new model
    in which every such sum is that one convolution (an `Add` layer, or `+`
    inside a subclassed layer's `call()` that traces, such as D-FINE's
    `DFineRepVggBlock`). Branches that cannot merge (different strides,
    groups or kinds of convolution, windows not centred alike, a branch
    reading another tensor) are kept, and `reparameterize_report` says why.

    Every other layer is the same object in the new model (its weights
    shared, never re-created); the original model is untouched. The result
    is a plain Keras model (a functional `keras.Model`, or a
    `keras.Sequential` for a Sequential model) for inference: `bnseq.fold`
    then folds what BatchNormalization is left.

    Args:
        model: `keras.Model`, built; or the path of a `.keras` file.
        strict: bool. If `True`, raise instead of keeping a sum that cannot
            merge.
        safe_mode: bool. Keras's `safe_mode` for loading a file.

    Returns:
        The reparameterized model.

    Raises:
        TypeError: if `model` is neither a model nor a path, or is a
            subclassed model whose `call()` does not trace.
        ValueError: if `model` is not built, or, with `strict=True`, if a sum
            of branches cannot merge (each is listed with the reason).

    Examples:
        >>> inputs = keras.Input((8, 8, 4))
        >>> a = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
        >>> b = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1)(inputs))
        >>> model = keras.Model(inputs, keras.layers.ReLU()(keras.layers.Add()([a, b, inputs])))
        >>> merged = bnseq.reparameterize(model)
        >>> [type(layer).__name__ for layer in merged.layers]
        ['InputLayer', 'Conv2D', 'ReLU']
        >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
        >>> bool(np.allclose(merged.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5))
        True
    """
    return reparameterize_with_report(model, strict=strict, safe_mode=safe_mode)[0]


def reparameterize_with_report(model, *, strict=False, safe_mode=True):
    """`reparameterize(model)` and `reparameterize_report(model)` from one reading of the model.

    Returns:
        (the reparameterized model, list of `Reparameterization`).
    """
    model = files.built_model(model, what="reparameterize", holds="weights", strict=strict, safe_mode=safe_mode)
    graph = graph_module.walk(model)
    plans = branches_module.decide(graph)
    report = [plan.decision for plan in plans]
    left = [decision for decision in report if not decision.merged]
    if strict and left:
        raise ValueError(
            f"{len(left)} sum(s) of branches of model '{model.name}' cannot be merged:\n"
            + "\n".join(f"- {decision}" for decision in left)
        )
    rebuild = rewrite.Plan("reparameterize", _plain_sequential)
    for plan in plans:
        if not plan.decision.merged:
            continue
        chain = _merged_layers(plan)
        rebuild.replace[id(plan.call.operation)] = chain
        rebuild.first_tensor.add(id(plan.call.operation))
        rebuild.drop.update(id(layer) for layer in plan.dropped)
        channels = _channels_in(plan)
        rebuild.finish.append(lambda plan=plan, conv=chain[-1], channels=channels: _set_weights(conv, plan, channels))
    return rewrite.apply(model, rebuild, graph.flat), report


def _merged_layers(plan):
    """The new layers in the place of the sum: `[ZeroPadding, conv]` or `[conv]`."""
    template = next(
        (branch.conv for branch in plan.branches if branch.conv is not None and branch.conv.name == plan.decision.into)
    )
    config = template.get_config()
    config.update(kernel_size=plan.kernel_size, use_bias=True, activation="linear")
    same = all(stride == 1 for stride in template.strides) and all(
        pair == ((k - 1) // 2, (k - 1) // 2) for k, pair in zip(plan.kernel_size, plan.pads)
    )
    layers = []
    if same:
        config["padding"] = "same"
    else:
        config["padding"] = "valid"
        if any(each for pair in plan.pads for each in pair):
            padding = plan.pads[0] if len(plan.kernel_size) == 1 else plan.pads
            layers.append(
                _PADDING_LAYERS[len(plan.kernel_size)](
                    padding=padding,
                    data_format=template.data_format,
                    name=f"{template.name}_padding",
                    dtype=template.dtype_policy,
                )
            )
    layers.append(type(template).from_config(config))
    return layers


def _channels_in(plan):
    shape = plan.branches[0].source.spec.shape
    conv = next(branch.conv for branch in plan.branches if branch.conv is not None)
    return shape[1 if conv.data_format == "channels_first" else -1]


def _set_weights(conv, plan, channels_in):
    kernel, bias = branches_module.merged_weights(plan, channels_in)
    dtype = keras.backend.standardize_dtype(conv.kernel.dtype)
    conv.set_weights([kernel.astype(dtype), bias.astype(dtype)])


def _plain_sequential(model, tensor, layers, unit_sizes):
    start = [] if tensor is None else [tensor]
    return keras.Sequential(start + list(layers), name=model.name, trainable=model.trainable)
