"""The project's one GPU script, ``benchmarks/gpu_suite.py``: wheels (peer installs per stage), stages (what
each stage runs and reads back), summary (JSON + markdown with every target), cli (the run)."""
