"""What every benchmark shares: interleaved timing, summaries, tables.

Timings are ratios measured side by side in one process: every round runs
each candidate once, in an order that rotates from round to round, so that a
slow moment of a shared machine falls on all candidates alike. Reported
figures are medians over rounds, with the min-max range.
"""

import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bnseq.exporting import runtimes  # noqa: E402  (the one interleaved timer, shared with export)


def interleaved(candidates, rounds, calls=1, warmup=1):
    """Seconds per call of each candidate, one figure per round.

    Args:
        candidates: dict of name -> callable taking no arguments.
        rounds: int. Rounds to measure.
        calls: int. Calls per candidate per round (their mean is one figure).
        warmup: int. Calls per candidate before measuring (tracing, caches).

    Returns:
        dict of name -> list of seconds, one per round.
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times = runtimes.interleaved_times([candidates[name] for name in names], rounds, calls)
    return dict(zip(names, times))


def timed(function):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def median(values):
    return statistics.median(values)


def spread(values, unit=1000.0, digits=1):
    """`median (min–max)` in milliseconds (or `unit` per second)."""
    return (
        f"{median(values) * unit:.{digits}f} "
        f"({min(values) * unit:.{digits}f}–{max(values) * unit:.{digits}f})"
    )


def ratio(numerator, denominator):
    return median(numerator) / median(denominator)


def table(header, rows):
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine():
    """One line on what the figures were measured on."""
    import keras

    versions = [f"Keras {keras.__version__}", f"backend {keras.backend.backend()}"]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions.append(f"TensorFlow {tf.__version__}")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, " + ", ".join(versions) + ", CPU"
    )


def readme_example():
    """The README's first example: a channels_first Conv2D, Flatten, two Dense layers (30.7M parameters)."""
    import keras
    from keras import layers

    import bnseq

    model = bnseq.Sequential(batch_norm=True)
    model.add(keras.Input((3, 100, 100)))
    model.add(layers.Conv2D(32, (3, 3), data_format="channels_first"))
    model.add(layers.Flatten())
    model.add(layers.Dense(100, activation="relu"))
    model.add(layers.Dense(10, activation="softmax"), batch_norm=False)
    return model
