#!/usr/bin/env python
"""The whole GPU suite of the project in one command that fits ~8 minutes (a 15-minute GPU window with a
rerun in it), each stage with its own time budget under one global deadline:

1. tests: ``TRITON_INTERPRET=0 pytest -m cuda tests`` (pass/fail counts, the failing tests);
2. kernels: ``gpu_kernels.py --quick``: every op at its target shapes against its peers (TRL 1.16, Liger,
   Cut Cross-Entropy), the device's peaks, correctness first, every kernel target;
3. e2e: ``e2e_ppo.py --scale 0.5b``: a PPO step of fastrlhf against TRL 1.12, a few steps;
4. rollout: ``rollout.py`` (issue 8's generation benchmark) when the checkout has it;
5. compile: ``torch.compile`` of the kernels' references, only with the time left.

    python3 benchmarks/gpu_suite.py --commit <sha> [--out DIR] [--time-budget-s 480] [--stages a,b]
    python3 benchmarks/gpu_suite.py --dry-run       # CPU: every stage at tiny sizes (CI)

Peers come from wheels in ``.whl/`` (``bash benchmarks/fetch_wheels.sh``), installed offline per stage.
Writes ``gpu-suite-<device>-<date>.{json,md,log}`` and ``...-files.tar.gz`` (every stage's own reports) to
``--out``, else ``$OUT``, else ``benchmarks/results/``; rewritten after every stage. Without CUDA and
without ``--dry-run`` it exits with status 2. Code: ``benchmarks/gpusuite/``.
"""

import sys

from gpusuite.cli import main

if __name__ == "__main__":
    sys.exit(main())
