#!/usr/bin/env python
"""End-to-end PPO step benchmark: fastrlhf against TRL 1.12's PPOTrainer (implementation: ``e2e/``).

python benchmarks/e2e_ppo.py --scale tiny            # CPU: tiny Llama, a few steps, a couple of minutes
python benchmarks/e2e_ppo.py --scale 0.5b|1.5b|8b    # one GPU; models from configs, no downloads
python benchmarks/e2e_ppo.py --scale tiny --systems fastrlhf --steps 2 --out /tmp/e2e
"""

from e2e.compare import main

if __name__ == "__main__":
    main()
