"""torchrun on 2 gloo ranks (CPU) against one process on the union batch: gradients, losses, statistics and
weights agree to fp32 rounding; checkpoints are written once and resume at either world size.

Each module-scoped fixture is one ``torchrun --nproc_per_node 2`` of ``tests/distributed_support.py`` running
several scenarios (the start-up, mostly imports, dominates); the one-process references run in this process.
Gradients are compared *before* the optimizer step: AdamW would hide a factor of 2 (averaged instead of summed
gradients), a gradient comparison does not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_support import (
    EIGHT_BIT_SAVE,
    EIGHT_BIT_STEPS,
    EightBitNet,
    make_base,
    run_eight_bit,
    run_ppo_update,
    run_rm,
    run_sft,
    run_whiten,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fastrlhf.checkpoint import latest_checkpoint
from fastrlhf.distributed.checkpoint import merge_optimizer_shards

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "tests" / "distributed_support.py"
GRAD_ATOL = 1e-6  # fp32, gradients ~1e-1: summation order only
WEIGHT_ATOL = 2e-5  # after 1-4 AdamW steps at lr 1e-2


def torchrun(scenarios: list[dict], timeout: float = 300, *, check: bool = True) -> str:
    """Run ``scenarios`` on 2 ranks; return what torchrun printed (stdout, then stderr)."""
    env = {**os.environ, "FASTRLHF_KERNELS": "torch", "OMP_NUM_THREADS": "1", "FASTRLHF_DIST_TIMEOUT": "120"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(SUPPORT), "list", json.dumps(scenarios)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    else:
        assert result.returncode != 0, "torchrun succeeded; expected it to fail"
    return output


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    return {"tied": str(make_base(root / "tied", tied=True)), "untied": str(make_base(root / "untied"))}


def assert_same_grads(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> None:
    assert len(got) == len(want) > 0, (len(got), len(want))
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == len(w), f"step {step}: {len(g)} vs {len(w)} gradients"
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b, atol=GRAD_ATOL, rtol=1e-5, msg=f"gradient at step {step}")


def assert_same_weights(got: dict, want: dict, atol: float = WEIGHT_ATOL) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-5, msg=f"weight {k}")


def _copy_checkpoints(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    shutil.copytree(src / "checkpoints", dst / "checkpoints")


# 16 demonstrations, batches of 8 in micro-batches of 2: 4 steps, a checkpoint after step 2.
SFT = {"epochs": 2, "save_every": 2}
LORA_SFT = {"model_config": {"lora_rank": 4}}

# 3 steps, checkpoints after steps 1 and 2 (the last step exports instead).
PPO_TRAIN = {"scenario": "ppo_train", "steps": 3, "save_every": 1}

# bf16 weights at lr 1e-4: most updates are below half a bf16 ulp, so only stochastic rounding moves them.
EIGHT_BIT_SR = {"dtype": "bfloat16", "lr": 1e-4}

# --------------------------------------------------------------------------------------- PPO, statistics

PPO_CASES = {
    # 4 models (policy, frozen reference, critic from the RM, frozen RM), tied embeddings, 2 minibatches.
    "critic_tied": {"base": "tied", "critic": "reward_model", "num_minibatches": 2},
    # value head on the policy trunk, reward whitening, 2 epochs, adaptive KL, micro-batches of 2.
    "head_whiten_rewards": {
        "base": "untied",
        "critic": "policy_head",
        "whiten_rewards": True,
        "ppo_epochs": 2,
        "num_minibatches": 1,
        "kl_target": 6.0,
        "micro_batch_size": 2,
    },
    # LoRA (reference = adapters off) with gradient checkpointing, both applied before sharding.
    "lora_checkpointing": {
        "base": "untied",
        "model_config": {"lora_rank": 4, "gradient_checkpointing": True},
    },
}


@pytest.fixture(scope="module")
def runs(bases, tmp_path_factory) -> Path:
    """Everything on 2 ranks in ONE torchrun (its start-up dominates): global statistics, the PPO cases, SFT
    (full, a resume of the one-process checkpoint, LoRA), the reward model, 8-bit AdamW (full, resumed,
    bf16) and train_ppo (full, then restarted after step 2). The one-process SFT and 8-bit runs come first
    here, since the 1 -> 2 resumes start from their checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    os.environ["FASTRLHF_KERNELS"] = "torch"
    try:
        run_sft({**SFT, "base": bases["tied"], "out": str(root / "sft_one")})
        run_sft({**LORA_SFT, "base": bases["untied"], "out": str(root / "lora_one")})
        run_eight_bit({"out": str(root / "8bit_one")})
    finally:
        os.environ.pop("FASTRLHF_KERNELS")
    _copy_checkpoints(root / "sft_one", root / "resume_1_to_2")
    _copy_checkpoints(root / "8bit_one", root / "8bit_1_to_2")
    scenarios = [
        {"scenario": "whiten", "out": str(root / "whiten2")},
        {"scenario": "job_costs", "out": str(root / "job_costs")},
    ]
    for name, case in PPO_CASES.items():
        scenarios.append(
            {"scenario": "ppo_update", **case, "base": bases[case["base"]], "out": str(root / name)}
        )
    scenarios += [
        {"scenario": "sft", **SFT, "base": bases["tied"], "out": str(root / "sft_two")},
        {"scenario": "sft", **SFT, "base": bases["tied"], "out": str(root / "resume_1_to_2")},
        {"scenario": "sft", **LORA_SFT, "base": bases["untied"], "out": str(root / "lora_two")},
        {"scenario": "rm", "base": bases["tied"], "out": str(root / "rm_two")},
    ]
    scenarios += [
        {"scenario": "eight_bit", "out": str(root / "8bit_two")},
        {"scenario": "eight_bit", "resume": True, "out": str(root / "8bit_1_to_2")},
        {"scenario": "copy_checkpoints", "src": str(root / "8bit_two"), "dst": str(root / "8bit_2_to_2")},
        {"scenario": "eight_bit", "resume": True, "out": str(root / "8bit_2_to_2")},
        {"scenario": "eight_bit", **EIGHT_BIT_SR, "out": str(root / "8bit_sr")},
    ]
    ppo = {**PPO_TRAIN, "base": bases["tied"]}
    scenarios += [
        {**ppo, "out": str(root / "ppo_full")},
        {"scenario": "copy_checkpoints", "src": str(root / "ppo_full"), "dst": str(root / "ppo_resumed")},
        {**ppo, "out": str(root / "ppo_resumed")},
    ]
    torchrun(scenarios)
    return root


@pytest.mark.parametrize("case", list(PPO_CASES))
def test_ppo_step_on_two_ranks_equals_one_process(runs, bases, case, tmp_path, torch_backend):
    args = {**PPO_CASES[case], "out": str(tmp_path)}
    args["base"] = bases[args["base"]]
    run_ppo_update(args)
    want = torch.load(tmp_path / "result.pt")
    got = torch.load(runs / case / "result.pt")
    # Experience: scores (frozen RM), log-probs (policy, reference), values, then global whitening.
    for name in ("scores", "logp", "ref_logp", "values", "rewards", "returns", "advantages"):
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    # Losses and every logged statistic are global (token-mean over all ranks).
    for key, value in want["stats"].items():
        assert got["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert got["kl_coef"] == pytest.approx(want["kl_coef"], rel=1e-9)
    assert_same_grads(got["grads"], want["grads"])
    for model in ("policy", "critic", "value_head"):
        assert_same_weights(got[model], want[model])


def test_global_statistics_equal_one_process(runs, tmp_path, torch_backend):
    run_whiten({"out": str(tmp_path)})
    want = torch.load(tmp_path / "whiten.pt")
    got = torch.load(runs / "whiten2" / "whiten.pt")
    for key, value in want.items():
        torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(value), atol=1e-6, rtol=1e-6)


def test_time_and_memory_are_the_slowest_and_fullest_rank(runs):
    """Rank r reported time 1 + r, peak memory 5 - r and 10 (r + 1) tokens/s."""
    got = torch.load(runs / "job_costs" / "job_costs.pt")
    assert got == {"time/update": 2.0, "memory_gib/step": 5.0, "rollout/tokens_per_second": 30.0}


# ------------------------------------------------------------------------- SFT, checkpoints, export


def test_sft_on_two_ranks_equals_one_process(runs):
    want = torch.load(runs / "sft_one" / "result.pt")
    got = torch.load(runs / "sft_two" / "result.pt")
    assert_same_grads(got["grads"], want["grads"])
    assert_same_weights(got["weights"], want["weights"])
    lines = [json.loads(x) for x in (runs / "sft_two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (runs / "sft_one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # rank 0 alone logs
    for a, b in zip(lines, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_rm_on_two_ranks_equals_one_process(runs, bases, tmp_path, torch_backend):
    """The ranking loss's pair normalization stays global; the held-out accuracy and the reward bias (the
    demonstrations' mean score) are computed on every rank alike."""
    run_rm({"base": bases["tied"], "out": str(tmp_path)})
    want, got = torch.load(tmp_path / "result.pt"), torch.load(runs / "rm_two" / "result.pt")
    assert_same_grads(got["grads"], want["grads"])
    assert_same_weights(got["weights"], want["weights"])
    assert got["accuracy"] == want["accuracy"]
    assert got["bias"] == pytest.approx(want["bias"], abs=1e-5)
    # The export, written once from the gathered state, scores as the one-process export does.
    got, want = (
        AutoModelForSequenceClassification.from_pretrained(d / "model") for d in (runs / "rm_two", tmp_path)
    )
    ids = torch.randint(3, got.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_is_written_once_and_resumes_at_either_world_size(runs, bases, tmp_path, torch_backend):
    ckpt = runs / "sft_two" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-000002"]  # no tmp/old leftovers
    assert latest_checkpoint(ckpt).name == "step-000002"
    assert sorted(p.name for p in (ckpt / "step-000002").iterdir()) == [
        "model.rank-00000-of-00002.safetensors", "model.rank-00001-of-00002.safetensors",
        "optimizers.rank-00000-of-00002.pt", "optimizers.rank-00001-of-00002.pt", "state.pt",
    ]  # fmt: skip
    want = torch.load(runs / "sft_one" / "result.pt")["weights"]
    # 1 -> 2: the one-process checkpoint resumed on two ranks ends where the uninterrupted run ended.
    resumed = torch.load(runs / "resume_1_to_2" / "result.pt")
    assert len(resumed["grads"]) == 2  # steps 3 and 4 only
    assert_same_weights(resumed["weights"], want)
    # 2 -> 1: the two-rank checkpoint resumed in one process.
    _copy_checkpoints(runs / "sft_two", tmp_path / "resume_2_to_1")
    run_sft({**SFT, "base": bases["tied"], "out": str(tmp_path / "resume_2_to_1")})
    got = torch.load(tmp_path / "resume_2_to_1" / "result.pt")
    assert len(got["grads"]) == 2
    assert_same_weights(got["weights"], want)


@pytest.mark.parametrize("run", ["sft_two", "lora_two"])
def test_exported_model_loads_with_from_pretrained(runs, run):
    """save_pretrained written once from the gathered full state dict (LoRA merged into the base, as in one
    process); transformers loads it and it gives the one-process export's log-probs."""
    one = "sft_one" if run == "sft_two" else "lora_one"
    got = AutoModelForCausalLM.from_pretrained(runs / run / "model")
    want = AutoModelForCausalLM.from_pretrained(runs / one / "model")
    assert not hasattr(got, "peft_config")
    ids = torch.randint(3, got.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = got(ids).logits.log_softmax(-1), want(ids).logits.log_softmax(-1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- 8-bit AdamW

# EightBitNet's parameters in the optimizer's order; 2-rank shards of the first 8-bit group start on a
# 256-element block boundary (the update is one process's, bit for bit), the second group's do not.
ALIGNED, MISALIGNED = ("a.weight", "b.weight"), ("v", "c.weight")
BIASES = ("a.bias", "b.bias", "c.bias")
PARAMS = [k for k, _ in EightBitNet().named_parameters()]


def assert_eight_bit_equal(got: dict, want: dict, lr: float = 1e-2) -> None:
    """Aligned 8-bit and 32-bit states: bit-equal weights. Misaligned: other blocks of the same moments,
    within 5% of the distance moved (each step moves ~lr)."""
    assert sorted(got) == sorted(want)
    for step in want:
        for k in ALIGNED + BIASES:
            assert torch.equal(got[step][k], want[step][k]), f"{k} after step {step}"
        for k in MISALIGNED:
            diff = (got[step][k] - want[step][k]).abs().max().item()
            assert diff <= 0.05 * lr * step, f"{k} after step {step}: {diff}"


def test_eight_bit_adamw_on_local_shards_equals_one_process(runs):
    want = torch.load(runs / "8bit_one" / "result.pt")
    assert sorted(want) == list(range(1, EIGHT_BIT_STEPS + 1))
    assert_eight_bit_equal(torch.load(runs / "8bit_two" / "result.pt"), want)
    # Each rank saved its shards' states; merged, they are one process's: 8-bit codes with one absmax per
    # 256-block of the full parameter, fp32 moments for the biases; aligned parameters' states are one
    # process's, bit for bit.
    path = runs / "8bit_two" / "checkpoints" / f"step-{EIGHT_BIT_SAVE:06d}"
    ranks = [torch.load(path / f"optimizers.rank-{r:05d}-of-00002.pt")["opt"] for r in range(2)]
    two = merge_optimizer_shards(ranks, list(EightBitNet().parameters()))
    one = torch.load(path.parents[1].parent / "8bit_one" / "checkpoints" / path.name / "optimizers.pt")["opt"]
    for index, name in enumerate(PARAMS):
        got, ref = (s["state"][index]["__bnb_optimizer_quant_state__"] for s in (two, one))
        assert two["state"][index]["step"] == EIGHT_BIT_SAVE
        assert sorted(got) == sorted(ref), name
        if name in BIASES:
            assert got["state1"].dtype == torch.float32
        else:
            assert got["state1"].dtype == torch.uint8 and got["state1"].shape == ref["state1"].shape
            assert got["absmax1"].shape == ref["absmax1"].shape, name
        if name not in MISALIGNED:
            for key in got:
                assert torch.equal(got[key], ref[key]), f"{name}: {key}"


def test_eight_bit_adamw_resumes_at_either_world_size(runs, tmp_path):
    """2 -> 2: each rank's own state back, misaligned blocks included: bit-equal to the uninterrupted run.
    1 -> 2: the one-process checkpoint on 2 ranks ends where the uninterrupted 2-rank run ended; 2 -> 1
    likewise against the uninterrupted one-process run."""
    want_two = torch.load(runs / "8bit_two" / "result.pt")
    got = torch.load(runs / "8bit_2_to_2" / "result.pt")
    assert sorted(got) == [4, 5]
    for step in got:
        for k in PARAMS:
            assert torch.equal(got[step][k], want_two[step][k]), f"{k} after step {step}"
    got = torch.load(runs / "8bit_1_to_2" / "result.pt")
    assert sorted(got) == [4, 5]
    assert_eight_bit_equal(got, {s: want_two[s] for s in got})
    _copy_checkpoints(runs / "8bit_two", tmp_path / "2_to_1")
    run_eight_bit({"resume": True, "out": str(tmp_path / "2_to_1")})
    want_one = torch.load(runs / "8bit_one" / "result.pt")
    got = torch.load(tmp_path / "2_to_1" / "result.pt")
    assert sorted(got) == [4, 5]
    assert_eight_bit_equal(got, {s: want_one[s] for s in got})


def test_stochastic_rounding_on_local_shards(runs, tmp_path):
    """bf16 weights on 2 ranks move, on average, as fp32 weights in one process do; with round-to-nearest
    most would not move at all (updates below half an ulp), a drift near -100%."""
    run_eight_bit({"lr": EIGHT_BIT_SR["lr"], "out": str(tmp_path)})
    fp32 = torch.load(tmp_path / "result.pt")[EIGHT_BIT_STEPS]
    bf16 = torch.load(runs / "8bit_sr" / "result.pt")[EIGHT_BIT_STEPS]
    torch.manual_seed(0)  # run_eight_bit's initial weights
    init = {k: v.detach().double() for k, v in EightBitNet().state_dict().items()}
    for k in ALIGNED + MISALIGNED:
        moved = fp32[k] - init[k]
        drift = ((bf16[k] - init[k].bfloat16().double()) - moved).sum() / moved.abs().sum()
        assert abs(drift) < 0.1, f"{k}: {drift:.3f}"


# ------------------------------------------------------------------------------------ PPO end to end


def test_train_ppo_on_two_ranks_resumes_exactly(runs):
    """train_ppo under torchrun: sampling under FSDP2 (ranks stop at different lengths), checkpoints after
    steps 1 and 2; a restart from the last ends bit-equal to the uninterrupted run (seeds derive from the
    step)."""
    full, resumed = runs / "ppo_full", runs / "ppo_resumed"
    a, b = torch.load(full / "result.pt"), torch.load(resumed / "result.pt")
    assert len(a["grads"]) == 6 and len(b["grads"]) == 2  # (2 minibatches) x (3 steps) vs step 3 only
    assert_same_weights(b["weights"], a["weights"], atol=0)
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["kl"] >= 0 and r["response_length"] > 0 for r in records)
    AutoModelForCausalLM.from_pretrained(full / "policy")


def test_a_killed_rank_stops_the_job_and_the_restart_resumes_exactly(runs, bases):
    """Rank 0 dies (SIGKILL) halfway through writing step 2's checkpoint, the other rank waiting in a
    collective: torchrun stops the job and names the rank and the signal; ``latest`` still names step 1, the
    half-written directory is never read; the restart resumes after step 1, removes the leftover and ends
    bit-equal to the uninterrupted run."""
    out = runs / "ppo_killed"
    ppo = {**PPO_TRAIN, "base": bases["tied"], "out": str(out)}
    output = torchrun([{**ppo, "die_saving": 2}], check=False)
    assert "SIGKILL" in output and "rank" in output, output[-4000:]
    ckpt = out / "checkpoints"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names[:2] == ["latest", "step-000001"] and len(names) == 3, names
    assert names[2].startswith("step-000002.tmp-")  # the half-written checkpoint
    assert latest_checkpoint(ckpt).name == "step-000001"
    assert not (ckpt / names[2] / "state.pt").exists() and not (out / "policy").exists()
    torchrun([ppo])
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-000001", "step-000002"]
    got, want = torch.load(out / "result.pt"), torch.load(runs / "ppo_full" / "result.pt")
    assert len(got["grads"]) == 4  # steps 2 and 3 (2 minibatches each)
    assert_same_weights(got["weights"], want["weights"], atol=0)
