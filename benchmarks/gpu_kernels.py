#!/usr/bin/env python
"""GPU benchmark of ``fastrlhf.kernels``: time, bandwidth, FLOP rate and extra memory against baselines.

Run on a CUDA machine (see benchmarks/README.md)::

    python benchmarks/gpu_kernels.py [--out DIR] [--quick] [--ops token_logprobs,gae,...]
    python benchmarks/gpu_kernels.py --dry-run          # CPU: every case at tiny sizes, each provider once
    python benchmarks/gpu_kernels.py --merge A.json B.json --out DIR   # one report from several runs

Per op it first checks every provider against the PyTorch reference (float64 where the reference takes it)
at a moderate shape and records the errors, then times each case for each provider: ``fastrlhf`` (the
Triton kernels), ``eager`` (the reference), ``compile`` (``torch.compile`` of the reference) and peers
where importable (TRL's fused log-prob kernels, Liger-Kernel's fused selective log-softmax, cross entropy
and fused linear cross entropy; ``bare_gemm`` for the linear op). It also measures the device's own peaks
(device-to-device copy bandwidth, bf16 8192^3 matmul) in the same run, and writes
``kernels-<device>-<date>.json`` (every raw record, the derived ratios and pass/fail targets) and a markdown
summary ``kernels-<device>-<date>.md``, which it also prints.

Robustness: each group of ops runs in its own worker process, so a kernel that kills the CUDA context costs
that provider only (the worker is restarted without it); OOM, errors and torch.compile failures are
recorded per case; a time budget (``--time-budget-s``, default 520 s, under the device's 10-minute command
limit) is shared out between the groups and cases past it are recorded as skipped; the report is rewritten
after every group, so even a killed run leaves its results.

The code lives in ``benchmarks/kernelbench/`` (this file is its entry point; ``fastrlhf`` need not be
installed: ``fastrlhf.kernels`` is then mapped onto ``kernels/`` of this checkout).
"""

import sys

from kernelbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
