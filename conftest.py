"""Settings for the whole suite, the notebooks included.

The notebooks run in their quick smoke mode under pytest (nbmake starts their
kernels from this process, so they inherit this environment), unless
BNSEQ_SMOKE is set otherwise.
"""

import os

os.environ.setdefault("BNSEQ_SMOKE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Notebooks that run their models in a runtime of an extra (their first cells import it), skipped
# where it is not installed: .ci/run's oldest-versions leg installs test-base, without the runtimes.
NEEDS = {"07_quantize_aware.ipynb": "ai_edge_litert"}


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import pytest

    for item in items:
        needed = NEEDS.get(os.path.basename(str(item.fspath)))
        if needed and importlib.util.find_spec(needed) is None:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} (bnseq's litert extra)"))
