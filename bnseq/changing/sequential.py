"""`bnseq.Sequential`: a `keras.Sequential` that places batch normalization."""


import keras

from bnseq import kinds
from bnseq import notices
from bnseq import probes
from bnseq.changing import layers as layers_module
from bnseq.changing import marks
from bnseq.changing import rewrite
from bnseq.changing import units
from bnseq.deciding import rules


class _EmptyModelError(ValueError, IndexError):
    """`pop()` on a model with no layers.

    A ValueError, as bnseq reports bad calls, and an IndexError, as
    `keras.Sequential.pop` raises for the same mistake, so code written for
    Keras keeps catching it.
    """


@keras.saving.register_keras_serializable(package="bnseq")
class Sequential(units.Units, keras.Sequential):
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

    Examples:
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
        units.STATE[self] = units.State()
        if layers:
            for position, layer in enumerate(layers):
                self._add(layer, False, None, f"item {position} of the layers list")
            self._maybe_rebuild()
        self._flush_warnings()

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

        Examples:
            >>> model = bnseq.Sequential([keras.Input((4,))])
            >>> model.add(keras.layers.Dense(8, activation="relu"), batch_norm=True)
            >>> [layer.name for layer in model.layers]  # doctest: +ELLIPSIS
            ['dense...', 'dense..._bn', 'dense..._relu']
        """
        self._add(layer, rebuild, batch_norm, len(self.layers))

    def _add(self, layer, rebuild, batch_norm, index):
        """`add()`, with `index` the position messages name (an int, or text)."""
        if not isinstance(layer, (keras.Layer, keras.KerasTensor)):
            # keras.Sequential's own message, with the position added.
            raise ValueError(
                "Only instances of `keras.Layer` can be added to a Sequential "
                f"model. Received: {layer} (of type {type(layer)}) as "
                f"{kinds.position(index)} of '{self.name}'."
            )
        options = self._options_for(layer, batch_norm, index)
        pending = units.STATE[self].pending
        if options is not False:
            unit = self._add_normalized(layer, options, rebuild, index)
            pending.extend((message, notices.BatchNormPlacementWarning) for message in unit.warnings)
        elif isinstance(layer, keras.layers.BatchNormalization) and batch_norm is None and self._inserted_batch_norm():
            self._take_over(layer, rebuild, index)
        else:
            if self._is_normalized(layer):
                self._check_not_in_model(layer, index)
            producer = self.layers[-1] if self.layers else None
            self._append([layer], rebuild)
            checks_itself = layers_module.is_auto(layer)  # it warns when it first runs
            if isinstance(layer, keras.layers.BatchNormalization) and producer is not None and not checks_itself:
                # Judged once the model is built, when the producer's rank is known.
                pending.append((lambda: rules.placement_problems(producer, layer), None))
        pending.append((lambda: probes.channels_first_warning(layer), notices.PlatformWarning))
        if rebuild:
            self._flush_warnings()

    def _flush_warnings(self):
        """Give the warnings of the layers added so far, now that they are in place."""
        state = units.STATE[self]
        pending = list(state.pending)
        state.pending.clear()  # in place: an add() in progress holds this list
        for message, category in pending:
            if callable(message):
                message = message()
            if not message:
                continue
            if category is None:  # placement problems: (code, message) pairs
                for _, text in message:
                    notices.warn(text)
            else:
                notices.warn(message, category)

    def save(self, filepath, *args, **kwargs):
        """Saves the model, as `keras.Model.save`; warns for the legacy `.h5` format.

        A `.h5` file records the model as a plain `keras.Sequential` (Keras's
        legacy format keeps no registered class name), so loading it gives the
        layers back without bnseq's settings (`batch_norm`, the units `pop()`
        takes back). `.keras` keeps them.
        """
        if str(filepath).endswith((".h5", ".hdf5")):
            notices.warn(
                f"bnseq.Sequential '{self.name}' is saved to '{filepath}' in Keras's "
                "legacy HDF5 format, which loads back as a plain keras.Sequential: "
                "the layers are kept, bnseq's settings (batch_norm, the units pop() "
                "takes back) are not. Save to a .keras file to keep them.",
                UserWarning,
            )
        return super().save(filepath, *args, **kwargs)

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

    def compile_from_config(self, config):
        """Compiles a loaded model as it was saved, as `keras.Model` does.

        Keras skips this step, with a warning, for any model that overrides
        `compile()`; a `.keras` file of a compiled bnseq.Sequential would load
        uncompiled, its optimizer state lost. This is Keras's own body of the
        method, through this class's `compile()`.
        """
        self.compile(**keras.saving.deserialize_keras_object(config))
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)  # its saved variables load into these

    def _add_normalized(self, layer, options, rebuild, index, batch_norm_name=None):
        """Split `layer` into its normalized unit and append the unit."""
        rewrite.check_splittable(layer, index)
        self._check_not_in_model(layer, index)
        activation = self._activation_for(layer, index)
        unit = rewrite.split(
            layer,
            options,
            {each.name for each in self._layers},
            index,
            batch_norm_name=batch_norm_name,
            activation=activation,
        )
        try:
            self._append(unit.layers, rebuild)
        except BaseException:
            unit.undo()
            raise
        units.STATE[self].inserted.add(unit.layers[1])
        return unit

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

        Examples:
            >>> model = bnseq.Sequential([keras.Input((4,))], batch_norm=True)
            >>> dense = keras.layers.Dense(8, activation="relu")
            >>> model.add(dense)
            >>> model.pop() is dense, len(model.layers)
            (True, 0)
        """
        if not self._unit_sizes:
            # keras.Sequential raises here too (an IndexError), but only after
            # removing the InputLayer; bnseq leaves the model as it was.
            raise _EmptyModelError(
                f"Sequential model '{self.name}' has no layers to pop. "
                "Check `len(model.layers)` before calling `pop()`"
                + (
                    "; the model's input stays (for another input, start a new model)."
                    if self._layers
                    else "."
                )
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
        state = units.STATE[self]
        previous, traced = state.graph, state.traced
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
                state.remember(self)
                self._flush_warnings()  # layers added with rebuild=False are placed now
                return
        super().build(input_shape)
        state.remember(self)
        self._flush_warnings()

    def get_config(self):
        config = super().get_config()
        config["batch_norm"] = units.serialize_options(self._batch_norm)
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
            batch_norm=units.deserialize_options(
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
        marked = marks.MARKS.get(layer) if isinstance(layer, keras.Layer) else None
        if batch_norm is None:
            if marked is not None:
                options = marked
            elif self._batch_norm is not False and kinds.is_linear(layer):
                return dict(self._batch_norm)
            else:
                return False
        else:
            owner = (
                kinds.describe(layer, index)
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

    @classmethod
    def _assemble(cls, layers, unit_sizes, input_tensor=None, **kwargs):
        """A model of `layers` as they are, grouped into units, built once.

        For the rewrite engine (`batch_normalize`): nothing is normalized
        again, as in `from_config`.
        """
        model = cls(**kwargs)
        model._restore_units(
            ([] if input_tensor is None else [input_tensor]) + list(layers), unit_sizes
        )
        if model._layers:
            model._maybe_rebuild()
        return model
