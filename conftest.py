"""Settings for the whole suite, the notebooks included.

The notebooks run in their quick smoke mode under pytest (nbmake starts their
kernels from this process, so they inherit this environment), unless
BNSEQ_SMOKE is set otherwise.
"""

import os

os.environ.setdefault("BNSEQ_SMOKE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
