"""`slm` in a child process (`accelerate launch`), under the suite's float switches (helpers/testenv.py).

Usage: python tests/helpers/slm_proc.py slm-args...
   or: python tests/helpers/slm_proc.py --many FILE.json   (a JSON list of slm-args lists)

`--many` runs the commands one after another in the same processes: a two-process launch costs its start (the
launcher, and every rank importing torch and transformers) once for all of them. Between two commands dynamo
forgets its compiled graphs, as a fresh process would (a compiled run's recompile count is its own). It stops at
the first command that fails, naming it on stderr.
"""

from __future__ import annotations

import json
import sys

import testenv

if __name__ == "__main__":
    testenv.apply()
    import torch

    from selective_lm.cli import main

    if sys.argv[1:2] != ["--many"]:
        sys.exit(main(sys.argv[1:]))
    with open(sys.argv[2]) as f:
        commands = json.load(f)
    for i, argv in enumerate(commands):
        torch._dynamo.reset()
        if (code := main(argv)) != 0:
            print(f"slm_proc: command {i} exited {code}: {' '.join(argv)}", file=sys.stderr)
            sys.exit(code)
