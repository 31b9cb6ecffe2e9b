"""The suite's switches for another float order, applied by the test process and by the children it starts.

`SLM_TEST_THREADS=N`: torch threads in the test process and in every child (OMP_NUM_THREADS), 1 by default:
the tiny models gain nothing from a second thread, pytest-xdist runs a worker per core (`make test`), and a
thread that waits on another cannot spin on a busy machine. `SLM_TEST_ONEDNN=0`: oneDNN off. With
`ATEN_CPU_CAPABILITY=avx2` (torch's own switch, inherited by the children) these give the reductions of another
CPU, to check that the suite's tolerances hold there (docs/tests.md).
"""

from __future__ import annotations

import getpass
import os
import tempfile


def threads() -> int:
    """Torch threads of the suite's processes: `SLM_TEST_THREADS`, 1 by default."""
    return int(os.environ.get("SLM_TEST_THREADS") or 1)


def apply() -> None:
    """Apply the switches to this process (before its first torch op) and, through the environment, its children."""
    import torch

    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability:
        # Inductor's on-disk cache does not tell apart the kernels it built under another capability: loading an
        # earlier default run's kernels under avx2 gave NaN losses (torch 2.13). One cache per capability.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                              os.path.join(tempfile.gettempdir(), f"torchinductor-{getpass.getuser()}-{capability}"))
    if os.environ.get("SLM_TEST_ONEDNN") == "0":
        torch.backends.mkldnn.enabled = False
    os.environ["OMP_NUM_THREADS"] = str(threads())
    torch.set_num_threads(threads())
