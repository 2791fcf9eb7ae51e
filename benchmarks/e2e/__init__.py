"""End-to-end PPO benchmarks: fastrlhf against TRL 1.12 (``compare``) and what fits under a memory cap
(``fit``). Run through ``benchmarks/e2e_ppo.py`` and ``benchmarks/fit_table.py``; importable as ``e2e`` when
``benchmarks/`` is on ``sys.path`` (as it is for those scripts and for pytest)."""
