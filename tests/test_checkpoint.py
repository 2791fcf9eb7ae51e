"""Checkpoints: exact resume (weights, Adam, RNG), atomicity under failure, pruning, tied weights, NaNs."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastrlhf.checkpoint as ckpt
from fastrlhf.checkpoint import (
    NonFiniteLossError,
    check_finite,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


class Opaque:
    """Picklable, but only by running this module's code: torch.load(weights_only=True) refuses it."""


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 32, (2, 6))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def make_run(seed: int) -> tuple[LlamaForCausalLM, torch.nn.Linear, torch.optim.Optimizer]:
    model = tiny_llama(seed)
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    return model, head, opt


def save(root, step, model, head, opt, **kw):
    return save_checkpoint(
        root, step, modules={"policy": model, "value_head": head}, optimizers={"adam": opt}, **kw
    )


def test_round_trip_restores_weights_adam_and_rng(tmp_path):
    model, head, opt = make_run(0)
    train_step(model, opt)
    random.seed(123)
    np.random.seed(321)
    path = save(tmp_path, 5, model, head, opt, state={"step": 5, "sched": {"last_epoch": 5}, "lrs": [0.1]})
    assert path == tmp_path / "step-000005"
    assert (tmp_path / "latest").read_text().strip() == "step-000005"
    expected_torch, expected_py, expected_np = torch.rand(4), random.random(), np.random.rand()
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_adam = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}

    model2, head2, opt2 = make_run(1)  # different init, empty optimizer, advanced RNG
    _ = torch.rand(10), random.random(), np.random.rand(3)  # move every RNG on
    state = load_checkpoint(
        tmp_path, modules={"policy": model2, "value_head": head2}, optimizers={"adam": opt2}
    )
    assert state == {"step": 5, "sched": {"last_epoch": 5}, "lrs": [0.1]}
    assert torch.equal(torch.rand(4), expected_torch)  # the RNG continues where it was saved
    assert random.random() == expected_py
    assert np.random.rand() == expected_np
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_weights[k]), k
    assert torch.equal(head2.weight, head.weight)
    for k, v in opt2.state_dict()["state"][0].items():
        assert torch.equal(v, expected_adam[k]), k
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # still tied after loading

    # The resumed run now trains exactly like the original one.
    torch.manual_seed(7)
    train_step(model, opt)
    torch.manual_seed(7)
    train_step(model2, opt2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_tied_weights_are_saved_once(tmp_path):
    from safetensors import safe_open

    model, head, opt = make_run(0)
    path = save(tmp_path, 1, model, head, opt, state={})
    with safe_open(path / "policy.safetensors", "pt") as f:
        names = set(f.keys())
    assert len({"lm_head.weight", "model.embed_tokens.weight"} & names) == 1


def test_no_checkpoint_returns_none(tmp_path):
    model, _, opt = make_run(0)
    assert latest_checkpoint(tmp_path / "missing") is None
    assert load_checkpoint(tmp_path, modules={"policy": model}, optimizers={"adam": opt}) is None


def test_failure_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, head, opt = make_run(0)
    good = save(tmp_path, 10, model, head, opt, state={"step": 10})
    good_weights = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt)

    calls = {"n": 0}
    real_save = ckpt.torch.save

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after the weights and optimizers.pt, while writing state.pt
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 20, model, head, opt, state={"step": 20})
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000010"]  # no half directory
    model2, head2, opt2 = make_run(1)
    state = load_checkpoint(
        tmp_path, modules={"policy": model2, "value_head": head2}, optimizers={"adam": opt2}
    )
    assert state == {"step": 10}
    for k, v in model2.state_dict().items():
        assert torch.equal(v, good_weights[k]), k


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path):
    model, head, opt = make_run(0)
    save(tmp_path, 1, model, head, opt, state={})
    leftover = tmp_path / "step-000002.tmp-abcd"  # a save killed before its rename
    leftover.mkdir()
    (leftover / "policy.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    save(tmp_path, 2, model, head, opt, state={})
    assert not leftover.exists()


def test_resaving_the_same_step_replaces_it(tmp_path):
    model, head, opt = make_run(0)
    save(tmp_path, 3, model, head, opt, state={"v": 1})
    save(tmp_path, 3, model, head, opt, state={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003"]
    assert load_checkpoint(
        tmp_path, modules={"policy": model, "value_head": head}, optimizers={"adam": opt}
    ) == {"v": 2}


def test_latest_naming_a_deleted_checkpoint(tmp_path):
    model, head, opt = make_run(0)
    path = save(tmp_path, 1, model, head, opt, state={})
    shutil.rmtree(path)
    with pytest.raises(FileNotFoundError, match="step-000001"):
        load_checkpoint(tmp_path, modules={"policy": model, "value_head": head}, optimizers={"adam": opt})
    save(tmp_path, 2, model, head, opt, state={})  # saving still works and repairs `latest`
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"


def test_interrupted_resave_recovers_the_moved_aside_copy(tmp_path):
    model, head, opt = make_run(0)
    path = save(tmp_path, 3, model, head, opt, state={"v": 1})
    path.rename(tmp_path / "step-000003.old-1234")  # killed between moving it aside and the new rename
    assert latest_checkpoint(tmp_path) == path
    assert path.is_dir()


def test_pruning_keeps_the_newest(tmp_path):
    model, head, opt = make_run(0)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, head, opt, state={}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000003", "step-000004"]
    save(tmp_path, 5, model, head, opt, state={}, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000005"]
    # Resumed at an earlier step: later checkpoints of the abandoned run are not ours to delete.
    (tmp_path / "step-000009").mkdir()
    save(tmp_path, 6, model, head, opt, state={}, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000006", "step-000009"]
    with pytest.raises(ValueError, match="keep"):
        save(tmp_path, 7, model, head, opt, state={}, keep=0)


def test_load_is_strict(tmp_path):
    model, head, opt = make_run(0)
    save(tmp_path, 1, model, head, opt, state={})
    with pytest.raises(RuntimeError, match="modules"):
        load_checkpoint(tmp_path, modules={"policy": model}, optimizers={"adam": opt})
    with pytest.raises(RuntimeError, match="optimizers"):
        load_checkpoint(tmp_path, modules={"policy": model, "value_head": head}, optimizers={})
    with pytest.raises(RuntimeError, match=r"size mismatch|Missing|Unexpected"):
        load_checkpoint(
            tmp_path,
            modules={"policy": model, "value_head": torch.nn.Linear(16, 2)},
            optimizers={"adam": opt},
        )


def test_state_that_needs_pickled_code_fails_at_save_time(tmp_path):
    model, head, opt = make_run(0)
    with pytest.raises(TypeError, match="weights_only"):
        save(tmp_path, 1, model, head, opt, state={"obj": Opaque()})
    assert latest_checkpoint(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_never_saved(tmp_path):
    model, head, opt = make_run(0)
    good = save(tmp_path, 1, model, head, opt, state={})
    with torch.no_grad():
        head.weight[0, 3] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"value_head\.weight holds nan/inf at step 2.*step-000001"):
        save(tmp_path, 2, model, head, opt, state={})
    assert latest_checkpoint(tmp_path) == good


def test_check_finite_messages():
    check_finite("loss", torch.tensor(1.5), step=3)
    check_finite("loss", 2.0, step=3)
    with pytest.raises(
        NonFiniteLossError, match=r"^loss is nan at step 12; last good checkpoint: runs/step-000010$"
    ):
        check_finite("loss", torch.tensor(float("nan")), 12, checkpoint="runs/step-000010")
    with pytest.raises(NonFiniteLossError, match=r"^loss is -inf at step 1$"):
        check_finite("loss", float("-inf"), 1)
    with pytest.raises(NonFiniteLossError, match=r"^values contains inf at step 4"):
        check_finite("values", torch.tensor([1.0, float("inf")]), 4)
    assert issubclass(NonFiniteLossError, RuntimeError)
