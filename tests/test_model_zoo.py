"""Issue 9, item 6: every decoder architecture in transformers' causal-LM mapping, built tiny from its own
config, loaded as policy, reference, reward model and critic, equals its own forward (``model_zoo_support``).

    FASTRLHF_ZOO_REPORT=benchmarks/results/model_zoo.md pytest tests/test_model_zoo.py -s

also writes the per-architecture table (``python -m tests.model_zoo_support --write ...`` does the same).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from model_zoo_support import markdown, run

# The only reasons a loader may refuse an architecture: what the model itself does, never an option we chose.
PRINCIPLED = re.compile(
    r"padded row differs from the same tokens unpadded"  # no attention mask, or positions that ignore it
    r"|not a causal model"
    r"|does not read the last hidden states"  # e.g. ProphetNet reads n-gram streams
    r"|is not one linear map"  # e.g. MusicGen's per-codebook heads
)


def test_every_architecture_matches_its_own_forward(torch_backend):
    results = run()
    table = markdown(results)
    print(table)
    if report := os.environ.get("FASTRLHF_ZOO_REPORT"):
        Path(report).write_text(table)
    failed = [f"{r.model_type}: {r.status}: {r.detail}" for r in results if r.status in ("wrong", "crash")]
    assert not failed, "\n".join(failed)
    unprincipled = [f"{r.model_type}: {r.detail}" for r in results if r.status == "refused"]
    unprincipled = [line for line in unprincipled if not PRINCIPLED.search(line)]
    assert not unprincipled, "\n".join(unprincipled)
    ok = [r for r in results if r.status == "ok"]
    assert len(ok) >= 0.8 * len(results), f"only {len(ok)} of {len(results)} architectures ok"
