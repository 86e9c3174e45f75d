import os

import pytest

# robosuite and numba print at import; keep test logs readable and runs deterministic on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
