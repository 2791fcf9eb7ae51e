"""The kernel benchmark behind ``benchmarks/gpu_kernels.py`` (a GPU run) and ``test_bench_kernels.py`` (CPU).

ops: importing fastrlhf.kernels and calling its ops · inputs: seeded input tensors · cases: what is measured
and the byte/FLOP models · timing: clocks, time limits, failure kinds, device peaks · peers: TRL and Liger ·
providers: what each provider runs for a case · check / measure: correctness and one measurement ·
worker: one group of ops · report: JSON and markdown · targets: pass/fail · cli: arguments and the run.
"""
