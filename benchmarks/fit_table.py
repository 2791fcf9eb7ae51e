#!/usr/bin/env python
"""What fits where: PPO under 12 / 16 / 24 GiB memory caps (implementation: ``e2e/fit.py``).

python benchmarks/fit_table.py                                   # GPU: every cell (long)
python benchmarks/fit_table.py --sizes 0.5b,1.5b --caps 24,16    # a subset; --merge joins runs
python benchmarks/fit_table.py --merge a.json b.json --out DIR   # one table from several runs
python benchmarks/fit_table.py --dry-run                         # CPU: one tiny cell, no cap (plumbing)
"""

from e2e.fit import main

if __name__ == "__main__":
    main()
