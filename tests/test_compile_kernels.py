"""The offline compile check: every kernel of every module compiles to cubin for sm_86, sm_89 and sm_90 with
no register spill (benchmarks/compile_kernels.py; Triton's bundled ptxas, no GPU). About 3 CPU-minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the compile check needs Triton (Linux)")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_kernels.py"
ARCHS = ("86", "89", "90")
MODULES = (
    "token_logprobs",
    "linear_token_logprobs",
    "kl_penalty",
    "gae",
    "whiten",
    "shape_rewards",
    "sample_tokens",
    "group_advantages",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # real JITFunctions, not the interpreter
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", *ARCHS, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return json.loads(out.read_text())


def test_every_kernel_module_compiles_for_every_arch_without_spills(report):
    assert report["failures"] == []
    assert set(MODULES) <= set(report["modules"])
    for module in MODULES:
        for arch in ARCHS:
            summary = report["modules"][module][arch]
            assert summary["variants"] > 0, f"{module}: no launch recorded for sm_{arch}"
            assert summary["errors"] == 0 and summary["spill_bytes"] == 0, (module, arch, summary)
    assert {v["arch"] for v in report["variants"]} == {int(a) for a in ARCHS}
    assert all(v["spill_bytes"] == 0 and v["registers"] <= 255 for v in report["variants"])


def test_linear_tiles_are_the_ones_each_arch_gets(report):
    """The forward's 128 x 128 bf16 tile is sm_90's only; sm_8x take 128 x 64 (the recording sets it)."""
    blocks = {
        (v["arch"], v["label"].split("BLOCK_V=")[1].split()[0])
        for v in report["variants"]
        if v["kernel"] == "_fwd_kernel" and "bfloat16" in v["case"]
    }
    assert blocks == {(86, "64"), (89, "64"), (90, "128")}
