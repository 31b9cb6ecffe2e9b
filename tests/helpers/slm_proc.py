"""`slm` in a child process (`accelerate launch`), under the suite's float switches (helpers/testenv.py).

Usage: python tests/helpers/slm_proc.py slm-args...
"""

from __future__ import annotations

import sys

import testenv

if __name__ == "__main__":
    testenv.apply()
    from selective_lm.cli import main

    sys.exit(main(sys.argv[1:]))
