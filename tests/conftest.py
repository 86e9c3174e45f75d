import os
import signal

import pytest

# robosuite and numba print at import; keep test logs readable and runs deterministic on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The Ctrl-C tests send SIGINT, to this process or to a `dopr` child. A shell script that starts pytest in the
# background (`pytest &`, nohup) starts it with SIGINT ignored, which its children inherit: Python then never
# raises KeyboardInterrupt and those tests fail for the way pytest was started. Ctrl-C is restored here; the
# children get the default, which Python turns into KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
