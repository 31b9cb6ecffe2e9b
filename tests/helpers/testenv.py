"""The suite's switches for another float order, read by the test process and by the children it starts.

`SLM_TEST_THREADS=N`: torch threads where a test pins them (the `one_thread` fixture, launched ranks; 1 by
default). `SLM_TEST_MKLDNN=0`: oneDNN off. With `ATEN_CPU_CAPABILITY=avx2` (torch's own switch) these give the
reductions of another CPU, to check that the suite's tolerances hold there (docs/tests.md).
"""

from __future__ import annotations

import os


def threads() -> int:
    """Torch threads for a test that pins them: `SLM_TEST_THREADS`, 1 by default."""
    return int(os.environ.get("SLM_TEST_THREADS") or 1)


def apply() -> None:
    """Apply `SLM_TEST_MKLDNN` to this process (call before the first torch op)."""
    import torch

    if os.environ.get("SLM_TEST_MKLDNN") == "0":
        torch.backends.mkldnn.enabled = False
