"""Keras masks on tensors: the one place bnseq reads Keras's private masking helpers.

Keras 3 carries a mask as an attribute of the tensor (`_keras_mask`, set by
`Embedding(mask_zero=True)`, `Masking` and every layer that passes a mask
on), read and written by `keras.src.backend.common.masking`, which has no
public name. A change there breaks recalibrate's masked moments, and
tests/test_recalibrate.py's masked tests show it.
"""

from keras.src.backend.common import masking as _keras_masking


def get_keras_mask(tensor):
    """The Keras mask `tensor` carries, or `None`."""
    return _keras_masking.get_keras_mask(tensor)


def carries_mask(spec):
    """Whether a symbolic tensor (a `KerasTensor`, or `None` when unknown) carries a mask."""
    return spec is not None and get_keras_mask(spec) is not None
