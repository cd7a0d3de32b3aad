"""What bnseq tells the user: two warning categories, a `warn` that points at the user, and
`first_line`, how an error from Keras or a runtime is quoted in one of bnseq's messages.

Kept apart from `deciding/`, which decides on plain values and says nothing.
"""

import os
import sys
import warnings

import keras


class BatchNormPlacementWarning(UserWarning):
    """Warned when a BatchNormalization is placed where it wastes or hurts.

    Every warning about a model's placement uses this category, so it can be
    filtered or turned into an error in one line::

        warnings.simplefilter("error", bnseq.BatchNormPlacementWarning)
    """


class PlatformWarning(UserWarning):
    """Warned when this machine's backend cannot run part of a model as written.

    Separate from `BatchNormPlacementWarning`: it is about the machine, not the
    model, and the same model runs elsewhere.
    """


def first_line(error):
    """The first line of an error's message, or its class name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def warn(message, category=BatchNormPlacementWarning):
    """Warn with `category`, pointing at the caller's line.

    The warning is attributed to the first frame outside bnseq and Keras (a
    layer list given to the constructor reaches `add()` through Keras), so
    the user sees their own line, once per line with the default filter.
    """
    skipped = tuple(
        os.path.dirname(path) + os.sep for path in (__file__, keras.__file__)
    )
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
