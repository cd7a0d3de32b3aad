"""`bnseq.Sequential`: a `keras.Sequential` that places batch normalization."""

import weakref

import keras

from bnseq import notices
from bnseq import probes
from bnseq import rewrite
from bnseq import rules

# Layers marked by `with_batch_norm` / `without_batch_norm`, for the list form
# of the constructor. Weak keys: a mark never keeps a layer alive.
_MARKS = weakref.WeakKeyDictionary()


class _EmptyModelError(ValueError, IndexError):
    """`pop()` on a model with no layers.

    A ValueError, as bnseq reports bad calls, and an IndexError, as
    `keras.Sequential.pop` raises for the same mistake, so code written for
    Keras keeps catching it.
    """


@keras.saving.register_keras_serializable(package="bnseq")
class Sequential(keras.Sequential):
    """A `keras.Sequential` that puts batch normalization in the right place.

    With `batch_norm=True`, `add()` takes each linear layer (`Dense`, the
    convolutions and their transposed, depthwise and separable forms), turns
    off its bias, splits off its activation, and puts a `BatchNormalization`
    on the layer's channel axis between the two:

    `Dense(100, activation="relu")` becomes `Dense(100, use_bias=False)`,
    `BatchNormalization(axis=-1)`, `Activation("relu")`.

    The bias is dropped because the normalization subtracts each channel's
    batch mean (`BN(Wx + b) = BN(Wx)`) and adds its own offset `beta`. The
    axis is `1` after a `channels_first` convolution and `-1` otherwise. Every
    other layer is added unchanged. With `batch_norm=False` (the default) this
    is a drop-in `keras.Sequential` that warns, with
    `bnseq.BatchNormPlacementWarning`, about BatchNormalization layers added
    in the wrong place.

    Args:
        layers: list of Layer, optional. Layers to add, as with `add()`; mark
            single layers with `bnseq.with_batch_norm` or
            `bnseq.without_batch_norm` to override `batch_norm` for them.
        trainable: bool. Whether the model's weights are trainable.
        name: str, optional. The model's name.
        batch_norm: bool or dict. `False`, `True`, or a dict of
            `keras.layers.BatchNormalization` arguments (`momentum`,
            `epsilon`, `center`, `scale`, initializers, regularizers,
            constraints, `synchronized`, ...) for every inserted
            normalization. `axis` is derived, not accepted.

    Raises:
        TypeError: if `batch_norm` is neither a bool nor a dict.
        ValueError: if `batch_norm` has `axis`, an unknown key, or a value
            `BatchNormalization` rejects.

    Example:

    >>> model = bnseq.Sequential(batch_norm=True)
    >>> model.add(keras.Input((3, 8, 8)))
    >>> model.add(keras.layers.Conv2D(4, 3, data_format="channels_first"))
    >>> model.add(keras.layers.Flatten())
    >>> model.add(keras.layers.Dense(16, activation="relu"))
    >>> model.add(keras.layers.Dense(10, activation="softmax"), batch_norm=False)
    >>> [type(layer).__name__ for layer in model.layers]
    ['Conv2D', 'BatchNormalization', 'Flatten', 'Dense', 'BatchNormalization', \
'Activation', 'Dense']
    >>> model.layers[1].axis, model.layers[4].axis, model.layers[0].use_bias
    (1, -1, False)
    """

    def __init__(self, layers=None, trainable=True, name=None, *, batch_norm=False):
        options = rules.check_batch_norm(batch_norm)
        super().__init__(trainable=trainable, name=name)
        self._batch_norm = options
        # How many layers each `add()` put in `self.layers`, so that `pop()`
        # can take back a whole unit, also after saving and loading.
        self._unit_sizes = ()
        _remember_graph(self, None)
        if layers:
            for layer in layers:
                self.add(layer, rebuild=False)
            self._maybe_rebuild()

    @property
    def batch_norm(self):
        """The model's setting: `False`, `True`, or a dict of options."""
        if self._batch_norm is False:
            return False
        return dict(self._batch_norm) or True

    def add(self, layer, rebuild=True, *, batch_norm=None):
        """Adds a layer on top of the stack, normalizing it if it is linear.

        A linear layer that is normalized stays the same object, changed to
        `use_bias=False` and the identity activation; its BatchNormalization
        and its activation follow it as layers of their own (the activation as
        an `Activation`, or the Layer itself when it was given as a Layer).
        An `activity_regularizer` moves to the last layer of the unit. The
        model is rebuilt once per call, not once per inserted layer.

        Args:
            layer: Layer, or a tensor from `keras.Input()`.
            rebuild: bool. Whether to rebuild the model now, as in
                `keras.Sequential.add`.
            batch_norm: bool or dict, optional. Overrides the model's setting
                for this layer: `False` adds it unchanged, `True` normalizes
                it, a dict normalizes it with these options on top of the
                model's. `None` follows the model (or the layer's
                `with_batch_norm`/`without_batch_norm` mark).

        Raises:
            TypeError: if `batch_norm` has the wrong type.
            ValueError: if `layer` is not a layer, if it cannot be normalized
                as asked (not linear, already built with a bias, already in
                the model), or if its name is taken. The model is left exactly
                as it was.

        Example:

        >>> model = bnseq.Sequential([keras.Input((4,))])
        >>> model.add(keras.layers.Dense(8, activation="relu"), batch_norm=True)
        >>> [layer.name for layer in model.layers]  # doctest: +ELLIPSIS
        ['dense...', 'dense..._bn', 'dense..._relu']
        """
        index = len(self.layers)
        if not isinstance(layer, (keras.Layer, keras.KerasTensor)):
            # keras.Sequential's own message, with the position added.
            raise ValueError(
                "Only instances of `keras.Layer` can be added to a Sequential "
                f"model. Received: {layer} (of type {type(layer)}) as layer "
                f"{index} of '{self.name}'."
            )
        options = self._options_for(layer, batch_norm, index)
        if options is False:
            if self._is_normalized(layer):
                self._check_not_in_model(layer, index)
            if isinstance(layer, keras.layers.BatchNormalization) and self.layers:
                for _, message in rules.placement_problems(self.layers[-1], layer):
                    notices.warn(message)
            self._append([layer], rebuild)
        else:
            self._add_normalized(layer, options, rebuild, index)
        probes.warn_once_if_channels_first_fails(layer)

    def compile(self, *args, **kwargs):
        """Configures the model for training, as `keras.Model.compile`.

        One difference, on machines where TensorFlow has no CPU kernels for
        channels_first convolutions (`bnseq.PlatformWarning` says when):
        `jit_compile="auto"` (the default) becomes `jit_compile=True` for a
        model with channels_first layers, so that `fit`, `evaluate` and
        `predict` run, compiled by XLA. Everywhere else, and for an explicit
        `jit_compile`, this is Keras's own `compile`.
        """
        explicit = len(args) >= 8 or kwargs.get("jit_compile", "auto") != "auto"
        eager = args[5] if len(args) > 5 else kwargs.get("run_eagerly", False)
        if not explicit and not eager and probes.needs_xla(self):
            kwargs["jit_compile"] = True
        super().compile(*args, **kwargs)

    def _add_normalized(self, layer, options, rebuild, index, batch_norm_name=None):
        """Split `layer` into its normalized unit and append the unit."""
        rewrite.check_splittable(layer, index)
        self._check_not_in_model(layer, index)
        unit = rewrite.split(
            layer,
            options,
            {each.name for each in self._layers},
            index,
            batch_norm_name=batch_norm_name,
        )
        try:
            self._append(unit.layers, rebuild)
        except BaseException:
            unit.undo()
            raise

    def pop(self, rebuild=True):
        """Removes the unit the last `add()` created and returns its layer.

        For a normalized layer this removes the layer, its BatchNormalization
        and its activation, and returns the layer as `add()` left it (with
        `use_bias=False` and the identity activation).

        Args:
            rebuild: bool. Whether to rebuild the model after the removal.

        Returns:
            The layer the last `add()` was given.

        Raises:
            ValueError: if the model has no layers (also an `IndexError`, as
                `keras.Sequential.pop` raises).

        Example:

        >>> model = bnseq.Sequential([keras.Input((4,))], batch_norm=True)
        >>> dense = keras.layers.Dense(8, activation="relu")
        >>> model.add(dense)
        >>> model.pop() is dense, len(model.layers)
        (True, 0)
        """
        if not self._unit_sizes:
            raise _EmptyModelError(
                f"Sequential model '{self.name}' has no layers to pop. "
                "Check `len(model.layers)` before calling `pop()`."
            )
        *rest, size = self._unit_sizes
        removed = [self._layers.pop() for _ in range(size)]
        self._unit_sizes = tuple(rest)
        self.built = False
        self._functional = None
        if rebuild and self._layers:
            self._maybe_rebuild()
        return removed[-1]

    def build(self, input_shape=None):
        """Builds the model's graph, extending the last one where it can.

        `keras.Sequential` re-traces every layer each time the model is
        rebuilt, and it rebuilds on every `add()`: building a deep model by
        `add()` takes time quadratic in its depth (measured on Keras 3.15: 600
        layers in 73 s). When the layers traced last time are still the start
        of the stack and the input is the same, only the new layers are called
        on the last graph's output. Anything else is Keras's own build.
        """
        previous, traced = self._bnseq_graph
        count = len(traced)
        if (
            previous is not None
            and 0 < count < len(self._layers)
            and all(a is b for a, b in zip(traced, self._layers))
            and isinstance(self._layers[0], keras.layers.InputLayer)
            and tuple(self._layers[0].batch_shape) == tuple(input_shape or ())
        ):
            try:
                outputs = previous.outputs[0]
                for layer in self._layers[count:]:
                    outputs = layer(outputs)
            except (NotImplementedError, TypeError):
                pass  # Keras's build knows what to do with these
            else:
                self._functional = keras.Model(inputs=self._layers[0].output, outputs=outputs)
                _remember_graph(self, self._functional)
                return
        super().build(input_shape)
        _remember_graph(self, self._functional)

    def get_config(self):
        config = super().get_config()
        config["batch_norm"] = _serialize_options(self._batch_norm)
        config["units"] = list(self._unit_sizes)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds a saved model without normalizing its layers again.

        `keras.Sequential.from_config` would call `add()` for every saved
        layer, which here would insert a second BatchNormalization after each
        linear layer, and rebuilds the model after each one. This adds the
        saved layers as they are, restores the units that `pop()` takes back,
        and builds the model once.
        """
        if "name" not in config or "layers" not in config:
            raise ValueError(
                "A Sequential model configuration must be a dictionary "
                f"containing the 'name' and 'layers' keys. Received: config={config}"
            )
        model = cls(
            name=config["name"],
            batch_norm=_deserialize_options(
                config.get("batch_norm", False), custom_objects
            ),
        )
        layers = [
            keras.layers.deserialize(layer_config, custom_objects=custom_objects)
            for layer_config in config["layers"]
        ]
        model._restore_units(layers, config.get("units"))
        if model._layers:
            model._maybe_rebuild()
        build_input_shape = config.get("build_input_shape")
        if not model._functional and isinstance(build_input_shape, (tuple, list)):
            model.build(build_input_shape)
        return model

    def _options_for(self, layer, batch_norm, index):
        """The BatchNormalization options for `layer`, or False for none."""
        marked = _MARKS.get(layer) if isinstance(layer, keras.Layer) else None
        if batch_norm is None:
            if marked is not None:
                options = marked
            elif self._batch_norm is not False and rules.is_linear(layer):
                return dict(self._batch_norm)
            else:
                return False
        else:
            owner = (
                rules.describe(layer, index)
                if isinstance(layer, keras.Layer)
                else f"layer {index}"
            )
            options = rules.check_batch_norm(batch_norm, owner=owner)
            if marked is not None and marked != options:
                raise ValueError(
                    f"{owner} was marked with "
                    f"{'without' if marked is False else 'with'}_batch_norm(), "
                    f"which contradicts add(batch_norm={batch_norm!r}). Keep "
                    "one of the two. "
                    f"Received: batch_norm={batch_norm!r}"
                )
        if options is False:
            return False
        return {**(self._batch_norm or {}), **options}

    def _is_normalized(self, layer):
        """Whether `layer` heads a unit that `add()` normalized."""
        start = 0
        for size in self._unit_sizes:
            if size > 1 and self.layers[start] is layer:
                return True
            start += size
        return False

    def _check_not_in_model(self, layer, index):
        if any(existing is layer for existing in self._layers):
            raise ValueError(
                f"{rules.describe(layer, index)} is already in Sequential model "
                f"'{self.name}'. Normalizing it again would change the copy "
                "already in the model; add a new layer instead (e.g. "
                f"`{type(layer).__name__}.from_config(layer.get_config())`). "
                f"Received: layer={layer!r}"
            )

    def _append(self, layers, rebuild):
        """Add `layers` as one unit; on any error, restore the model."""
        snapshot = list(self._layers)
        state = (self._functional, self.built, len(self.layers))
        names = {each.name for each in self._layers}
        for layer in layers[1:]:
            if layer.name in names:
                raise ValueError(
                    "All layers added to a Sequential model should have unique "
                    f"names. Name '{layer.name}' is already the name of a layer "
                    "in this model. Update the `name` argument to pass a "
                    "unique name."
                )
        try:
            for layer in layers:
                super().add(layer, rebuild=False)
            if rebuild:
                self._maybe_rebuild()
        except BaseException:
            while len(self._layers) > len(snapshot):
                self._layers.pop()
            if any(now is not before for now, before in zip(self._layers, snapshot)):
                self._layers = snapshot
            self._functional, self.built, _ = state
            raise
        added = len(self.layers) - state[2]
        if added:
            self._unit_sizes = (*self._unit_sizes, added)

    def _restore_units(self, layers, unit_sizes):
        """Append saved layers as they are, grouped into their saved units."""
        for layer in layers:
            super().add(layer, rebuild=False)
        count = len(self.layers)
        if unit_sizes is None or sum(unit_sizes) != count:
            unit_sizes = [1] * count
        self._unit_sizes = tuple(unit_sizes)


def _remember_graph(model, functional):
    """Keep the graph just built, and the layers it covers, for `build`.

    Stored around Keras's attribute tracking (`object.__setattr__`): tracked,
    every superseded graph would stay a sublayer of the model (and, on the
    PyTorch backend, a registered child module).
    """
    layers = tuple(model._layers) if functional is not None else ()
    object.__setattr__(model, "_bnseq_graph", (functional, layers))


def with_batch_norm(layer, **options):
    """Marks a linear layer to be normalized when a `bnseq.Sequential` adds it.

    For the list form of the constructor, where `add()`'s per-layer
    `batch_norm` argument cannot be given. The options are checked now and
    merged over the model's own when the layer is added.

    Args:
        layer: Layer. One of the linear layers bnseq normalizes.
        **options: `keras.layers.BatchNormalization` arguments other than
            `axis`.

    Returns:
        `layer`, marked.

    Raises:
        TypeError: if `layer` is not a Keras layer.
        ValueError: if it is not a linear layer, or an option is invalid.

    Example:

    >>> model = bnseq.Sequential([
    ...     keras.Input((4,)),
    ...     bnseq.with_batch_norm(keras.layers.Dense(8, activation="relu"),
    ...                           momentum=0.9),
    ...     keras.layers.Dense(2),
    ... ])
    >>> [type(layer).__name__ for layer in model.layers]
    ['Dense', 'BatchNormalization', 'Activation', 'Dense']
    >>> model.layers[1].momentum
    0.9
    """
    _check_markable(layer, "with_batch_norm")
    rewrite.check_splittable(layer)
    _MARKS[layer] = rules.check_batch_norm(
        options or True, owner=rules.describe(layer)
    )
    return layer


def without_batch_norm(layer):
    """Marks a layer to be added unchanged by a `bnseq.Sequential`.

    Args:
        layer: Layer.

    Returns:
        `layer`, marked.

    Raises:
        TypeError: if `layer` is not a Keras layer.

    Example:

    >>> model = bnseq.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(8, activation="relu"),
    ...     bnseq.without_batch_norm(keras.layers.Dense(2, activation="softmax")),
    ... ], batch_norm=True)
    >>> [type(layer).__name__ for layer in model.layers]
    ['Dense', 'BatchNormalization', 'Activation', 'Dense']
    """
    _check_markable(layer, "without_batch_norm")
    _MARKS[layer] = False
    return layer


def _check_markable(layer, function):
    if not isinstance(layer, keras.Layer):
        raise TypeError(
            f"`{function}` marks a Keras layer. Received: layer={layer!r} "
            f"(of type {type(layer).__name__})"
        )


def _serialize_options(options):
    if options is False:
        return False
    return {
        key: keras.saving.serialize_keras_object(value)
        for key, value in options.items()
    }


def _deserialize_options(saved, custom_objects):
    if saved is False or saved is True:
        return saved
    return {
        key: (
            keras.saving.deserialize_keras_object(
                value, custom_objects=custom_objects
            )
            if isinstance(value, dict) and "class_name" in value
            else value
        )
        for key, value in saved.items()
    }
