"""Shared test set-up: quiet TensorFlow, seeded Keras, a Hypothesis budget."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings  # noqa: E402

import bnseq  # noqa: E402

# The workers of tests/test_distributed.py are scripts it runs in subprocesses, each setting up its
# backend and devices: not test modules (nor doctest modules) to import here.
collect_ignore_glob = ["*_worker.py"]

# A fixed example budget with no deadline: these machines are shared and
# noisy, and Keras model building is slow enough that timing would flake.
# `ci` also derandomizes, so a CI run is repeatable.
_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# `dev` (the README command without CI set) draws the same number afresh on every run.
settings.register_profile("ci", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=12, **_COMMON)
# The long run of the differential fuzzer (tests/test_fuzz.py) and of every property test:
# HYPOTHESIS_PROFILE=fuzz, with BNSEQ_FUZZ_EXAMPLES examples (default 300).
settings.register_profile("fuzz", max_examples=int(os.environ.get("BNSEQ_FUZZ_EXAMPLES", "300")), **_COMMON)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture(autouse=True)
def _fresh_keras():
    """Each test starts with fresh layer names and the same random state.

    Without Keras's full `gc.collect()`: with TensorFlow and keras-hub loaded it takes 0.2 s, a
    third of the suite's time over its thousand tests, and Python's own collector still runs.
    """
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(bnseq=bnseq, keras=keras, np=np)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (large models) run only with BNSEQ_SLOW=1; the README documents it."""
    if os.environ.get("BNSEQ_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="a slow test: set BNSEQ_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
