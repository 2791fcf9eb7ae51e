"""The TRL side of a run: TRL 1.12's ``trl.experimental.ppo.PPOTrainer`` configured like fastrlhf, its phases
timed by :mod:`e2e.trl_timing`.

Generation length is fixed: TRL builds its own ``GenerationConfig`` inside ``train()`` and transformers 5
fills every field left unset there from the policy's ``generation_config``, so ``min_new_tokens`` and
``suppress_tokens = [pad]`` set there mask EOS until the limit, as fastrlhf's ``generate`` arguments do.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from e2e.probes import OptimizerStepCounter, rss_gib
from e2e.spec import RunSpec
from e2e.trl_timing import PhaseClock, instrument_trl, phase_callback, trl_phases

TRL_OPTIMIZERS = {  # fastrlhf's optimizer names -> TRL's (transformers') optim
    "adamw": "adamw_torch",
    "adamw8bit": "adamw_bnb_8bit",
    "paged_adamw8bit": "paged_adamw_8bit",
}


def _lora_value_model(model: Any, spec: RunSpec) -> Any:
    """LoRA adapters injected in place into the value model (it stays a SequenceClassification model, as
    TRL's ``PolicyAndValueWrapper`` and ``get_reward`` expect), plus a trainable score head: fastrlhf's
    LoRA critic."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in model.named_modules()
            if type(mod).__name__ == "Linear" and not name.endswith("score")
        }
    )
    lora = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=targets)
    model = inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("score."))
    return model


def _load_models(spec: RunSpec, tok: Any, cuda: bool) -> dict[str, Any]:
    """PPOTrainer's model arguments: policy, reference (None with LoRA: the adapter-disabled policy), reward
    and value models, and the policy's LoRA config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    load: dict[str, Any] = {
        "dtype": getattr(torch, spec.dtype),
        "attn_implementation": spec.attn_implementation,
    }
    if cuda:
        load["device_map"] = {"": 0}  # straight to the GPU; PPOTrainer's .to(device) is then a no-op
    policy = AutoModelForCausalLM.from_pretrained(spec.policy_dir, **load)
    ref = None if spec.lora_rank else AutoModelForCausalLM.from_pretrained(spec.policy_dir, **load)
    value = AutoModelForSequenceClassification.from_pretrained(spec.reward_dir, num_labels=1, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(spec.reward_dir, num_labels=1, **load)
    reward.requires_grad_(False)
    if ref is not None:
        ref.requires_grad_(False)
    if spec.gradient_checkpointing:  # PPOTrainer.train() never turns it on itself
        for m in (policy, value):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.config.use_cache = False
    peft_config = None
    if spec.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        value = _lora_value_model(value, spec)
    # Fixed response length: TRL's GenerationConfig leaves these unset, so generate() takes them from here.
    policy.generation_config.min_new_tokens = spec.response_len
    policy.generation_config.suppress_tokens = [tok.pad_token_id]
    policy.generation_config.pad_token_id = tok.pad_token_id
    return {
        "model": policy,
        "ref_model": ref,
        "reward_model": reward,
        "value_model": value,
        "peft_config": peft_config,
    }


def trl_config(spec: RunSpec, cuda: bool) -> Any:
    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        output_dir=str(Path(spec.work_dir) / "trl-out"),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=spec.seed,
        bf16=spec.dtype == "bfloat16",
        fp16=False,
        use_cpu=not cuda,
        optim=TRL_OPTIMIZERS[spec.optimizer],
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        gradient_checkpointing=spec.gradient_checkpointing,
        per_device_train_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.rollout_batch_size // spec.micro_batch_size,
        num_mini_batches=spec.num_minibatches,
        num_ppo_epochs=spec.ppo_epochs,
        total_episodes=spec.steps * spec.rollout_batch_size,
        local_rollout_forward_batch_size=spec.rollout_forward_batch_size,
        response_length=spec.response_len,
        stop_token="eos",
        temperature=spec.temperature,
        missing_eos_penalty=None,
        kl_coef=spec.kl_coef,
        kl_estimator="k1",
        num_sample_generations=0,
        dataloader_num_workers=0,
    )


def run_trl(spec: RunSpec, info: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.ppo import PPOTrainer

    info["rss_after_imports_gib"] = rss_gib()
    cuda = info["device"] == "cuda"
    tok = AutoTokenizer.from_pretrained(spec.policy_dir)
    tok.padding_side = "left"
    ids = [tok(p)["input_ids"] for p in spec.prompts]
    if {len(x) for x in ids} != {spec.prompt_len}:
        raise ValueError(f"prompts must all be {spec.prompt_len} tokens, got {sorted({len(x) for x in ids})}")
    args = trl_config(spec, cuda)
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        **_load_models(spec, tok, cuda),
    )
    clock = PhaseClock(cuda)
    checks: list[dict[str, int]] = []
    instrument_trl(clock, checks, tok.pad_token_id, tok.eos_token_id)
    counter = OptimizerStepCounter()
    opt_marks: list[dict[int, int]] = []
    trainer.add_callback(phase_callback(clock, counter, opt_marks))
    t0 = time.perf_counter()
    trainer.train()
    info["total_s"] = time.perf_counter() - t0
    info["gradient_checkpointing_active"] = bool(
        getattr(trainer.model.policy, "is_gradient_checkpointing", False)
    )
    info["trl_batch_sizes"] = {
        k: getattr(args, k)
        for k in ("batch_size", "mini_batch_size", "local_mini_batch_size", "per_device_train_batch_size")
    }
    steps = trl_phases(clock.events, clock.housekeeping)
    before: dict[int, int] = {}
    for rec, mark, check in zip(steps, opt_marks, checks, strict=False):
        rec["optimizer_steps"] = counter.per_optimizer(mark, before)
        rec["optimizers"] = len(mark)
        rec.update(check)
        before = mark
    return {"steps": steps}
