"""Every option of every command, given a bad value, fails on the command line in one line that names the
option and its value, with no traceback, before any model (or tokenizer) is loaded.

The options are enumerated from the config dataclasses, so a new option without an entry in ``BAD`` (or in
``ACCEPTS_ANYTHING``) fails ``test_every_option_has_a_bad_value``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import transformers

import fastrlhf.rank
from fastrlhf.cli import config_class, main
from fastrlhf.config import (
    ConfigError,
    JudgeConfig,
    ModelConfig,
    OptimConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    field_docs,
)

COMMANDS = ("sft", "rm", "ppo", "sample", "pipeline", "judge", "rank", "demo")

M = "./missing"  # a local-looking path that does not exist
FILE, DIR = "{file}", "{dir}"  # an existing plain file; an existing directory that holds no model

BAD: dict[tuple[str, str], list[str]] = {
    # ModelConfig
    ("ModelConfig", "dtype"): ["fp8"],
    ("ModelConfig", "attn_implementation"): ["fast"],
    ("ModelConfig", "gradient_checkpointing"): ["maybe"],
    ("ModelConfig", "lora_rank"): ["-1"],
    ("ModelConfig", "lora_alpha"): ["0"],
    ("ModelConfig", "load_in_4bit"): ["maybe"],
    ("ModelConfig", "optimizer"): ["sgd"],
    ("ModelConfig", "trust_remote_code"): ["maybe"],
    ("ModelConfig", "verify_fast_path"): ["maybe"],
    # OptimConfig
    ("OptimConfig", "lr"): ["-1", "nan"],
    ("OptimConfig", "warmup_steps"): ["-1", "1.5"],
    ("OptimConfig", "weight_decay"): ["-0.1"],
    ("OptimConfig", "max_grad_norm"): ["-1", "inf"],
    ("OptimConfig", "adam_eps"): ["0"],
    # SFTConfig
    ("SFTConfig", "model"): [f"{M}/model", FILE, DIR],
    ("SFTConfig", "data"): [f"{M}/demos.jsonl"],
    ("SFTConfig", "out"): [FILE],
    ("SFTConfig", "epochs"): ["0"],
    ("SFTConfig", "batch_size"): ["0", "12"],
    ("SFTConfig", "micro_batch_size"): ["0", "3"],
    ("SFTConfig", "max_len"): ["1"],
    ("SFTConfig", "save_every"): ["-1"],
    ("SFTConfig", "wandb"): ["maybe"],
    ("SFTConfig", "seed"): ["-1"],
    # RMConfig
    ("RMConfig", "model"): [f"{M}/model", FILE],
    ("RMConfig", "data"): [f"{M}/ranks.jsonl"],
    ("RMConfig", "demonstrations"): [f"{M}/demos.jsonl"],
    ("RMConfig", "out"): [FILE],
    ("RMConfig", "epochs"): ["0"],
    ("RMConfig", "batch_size"): ["0"],
    ("RMConfig", "micro_batch_size"): ["0", "3"],
    ("RMConfig", "eval_fraction"): ["1", "-0.1"],
    ("RMConfig", "max_len"): ["0"],
    ("RMConfig", "soft_targets"): ["maybe"],
    ("RMConfig", "save_every"): ["-1"],
    ("RMConfig", "wandb"): ["maybe"],
    ("RMConfig", "seed"): ["-1"],
    # JudgeConfig
    ("JudgeConfig", "model"): [f"{M}/judge", DIR],
    ("JudgeConfig", "data"): [f"{M}/samples.jsonl"],
    ("JudgeConfig", "out"): [DIR],
    ("JudgeConfig", "template"): [f"{M}/template.txt", FILE],
    ("JudgeConfig", "label_a"): ["", "B"],
    ("JudgeConfig", "label_b"): [" ", "A"],
    ("JudgeConfig", "use_chat_template"): ["maybe"],
    ("JudgeConfig", "share_prefix"): ["maybe"],
    ("JudgeConfig", "batch_size"): ["0"],
    ("JudgeConfig", "max_response_tokens"): ["-1"],
    ("JudgeConfig", "aggregate"): ["borda"],
    ("JudgeConfig", "bt_prior"): ["0"],
    ("JudgeConfig", "min_label_mass"): ["1.5"],
    # RolloutConfig
    ("RolloutConfig", "backend"): ["vllm"],
    ("RolloutConfig", "prompt_bucket"): ["0"],
    ("RolloutConfig", "min_batch_bucket"): ["0"],
    ("RolloutConfig", "prefill_tokens"): ["0"],
    ("RolloutConfig", "compact_every"): ["0"],
    ("RolloutConfig", "cuda_graphs"): ["maybe"],
    ("RolloutConfig", "keep_cache"): ["maybe"],
    # PPOConfig
    ("PPOConfig", "policy"): [f"{M}/policy", FILE],
    ("PPOConfig", "reference"): [f"{M}/reference"],
    ("PPOConfig", "reward_model"): [f"{M}/rm", DIR],
    ("PPOConfig", "prompts"): [f"{M}/prompts.txt"],
    ("PPOConfig", "out"): [FILE],
    ("PPOConfig", "critic"): ["value_head"],
    ("PPOConfig", "steps"): ["0"],
    ("PPOConfig", "rollout_batch_size"): ["0", "10"],
    ("PPOConfig", "ppo_epochs"): ["0"],
    ("PPOConfig", "num_minibatches"): ["0", "3"],
    ("PPOConfig", "micro_batch_size"): ["0"],
    ("PPOConfig", "max_prompt_len"): ["0"],
    ("PPOConfig", "max_new_tokens"): ["0"],
    ("PPOConfig", "min_new_tokens"): ["-1", "129"],
    ("PPOConfig", "temperature"): ["0", "-1", "nan", "inf"],
    ("PPOConfig", "top_p"): ["0", "1.5"],
    ("PPOConfig", "missing_eos_penalty"): ["nan", "-1"],
    ("PPOConfig", "kl_coef"): ["-0.1"],
    ("PPOConfig", "kl_target"): ["0", "-1"],
    ("PPOConfig", "kl_horizon"): ["0"],
    ("PPOConfig", "kl_estimator"): ["k4"],
    ("PPOConfig", "gamma"): ["1.5"],
    ("PPOConfig", "lam"): ["-0.1"],
    ("PPOConfig", "whiten_rewards"): ["maybe"],
    ("PPOConfig", "clip_range"): ["-0.1"],
    ("PPOConfig", "value_clip_range"): ["-0.1"],
    ("PPOConfig", "vf_coef"): ["-1"],
    ("PPOConfig", "advantage_estimator"): ["ppo"],
    ("PPOConfig", "group_size"): ["1"],
    ("PPOConfig", "value_trunk_grad_scale"): ["2"],
    ("PPOConfig", "target_kl"): ["0"],
    ("PPOConfig", "ptx_coef"): ["-1"],
    ("PPOConfig", "ptx_data"): [f"{M}/ptx.jsonl"],
    ("PPOConfig", "offload_frozen"): ["maybe"],
    ("PPOConfig", "save_every"): ["-1"],
    ("PPOConfig", "wandb"): ["maybe"],
    ("PPOConfig", "seed"): ["-1"],
    # PipelineConfig
    ("PipelineConfig", "out"): [FILE],
    ("PipelineConfig", "skip_sft"): ["maybe"],
    ("PipelineConfig", "labeling"): ["people"],
    ("PipelineConfig", "rounds"): ["0"],
    ("PipelineConfig", "sample_prompts"): [f"{M}/prompts.txt"],
    ("PipelineConfig", "k"): ["1"],
    ("PipelineConfig", "resume"): ["maybe"],
    # RankConfig
    ("RankConfig", "data"): [""],
    ("RankConfig", "out"): ["", DIR],
    ("RankConfig", "host"): ["bad host!"],
    ("RankConfig", "port"): ["70000", "-1"],
    ("RankConfig", "allow_hosts"): ["ok.example, bad host!"],
    ("RankConfig", "token"): ["short"],
    ("RankConfig", "overlap"): ["-1"],
    ("RankConfig", "seed"): ["-1"],
    ("RankConfig", "flags"): ["Bad Id:label"],
    ("RankConfig", "open_browser"): ["maybe"],
    # DemoConfig
    ("DemoConfig", "out"): [FILE],
    ("DemoConfig", "seed"): ["-1"],
    ("DemoConfig", "hidden_size"): ["0", "12"],
    ("DemoConfig", "layers"): ["0"],
    ("DemoConfig", "sft_examples"): ["16"],
    ("DemoConfig", "sft_epochs"): ["0"],
    ("DemoConfig", "rankings"): ["10"],
    ("DemoConfig", "rm_epochs"): ["0"],
    ("DemoConfig", "k"): ["1"],
    ("DemoConfig", "ppo_steps"): ["0"],
    ("DemoConfig", "rollout_batch_size"): ["0", "6"],
    ("DemoConfig", "eval_prompts"): ["0"],
    ("DemoConfig", "wandb"): ["maybe"],
    ("DemoConfig", "rounds"): ["0"],
    ("DemoConfig", "labeler"): ["crowd"],
    ("DemoConfig", "judge_noise"): ["-1"],
    ("DemoConfig", "judge_position_bias"): ["nan"],
    ("DemoConfig", "soft_targets"): ["maybe"],
    ("DemoConfig", "kl_coef"): ["-1"],
    ("DemoConfig", "estimator"): ["ppo"],
}
"""(config class, field) -> values that must be refused, as typed on the command line."""

ACCEPTS_ANYTHING: set[tuple[str, str]] = set()
"""Fields with no bad value at all (a free string, say). None so far: add one here only with a reason."""

VALUE_NOT_ECHOED = {("RankConfig", "token"), ("RankConfig", "flags")}
"""The message names the option but not the whole value (a secret is masked; a bad flag id is quoted)."""

SAMPLE_ARGS = {"model": [f"{M}/model", FILE], "prompts": [f"{M}/prompts.jsonl"], "out": [DIR], "k": ["1"]}
"""`fastrlhf sample`'s own (argparse) options."""

COMBINATIONS = [
    ("sft", ["--batch_size", "12", "--micro_batch_size", "8"], "batch_size"),
    ("ppo", ["--advantage_estimator", "grpo", "--group_size", "3"], "group_size"),
    ("ppo", ["--advantage_estimator", "rloo", "--rollout_batch_size", "6", "--num_minibatches", "2"],
     "group_size"),
    ("ppo", ["--ptx_coef", "0.5"], "ptx_data"),
    ("ppo", ["--reward_model", ""], "reward_model"),
    ("ppo", ["--critic", "policy_head", "--reward_model", ""], "reward_model"),
    ("ppo", ["--max_new_tokens", "8", "--min_new_tokens", "9"], "min_new_tokens"),
    ("ppo", ["--model_config.load_in_4bit", "true"], "model_config.lora_rank"),
    ("ppo", ["--offload_frozen", "true", "--model_config.load_in_4bit", "true",
             "--model_config.lora_rank", "8"], "offload_frozen"),
    ("ppo", ["--policy", "{dir}/nested/policy"], "policy"),
    ("pipeline", ["--labeling", "judge"], "judge.model"),
    ("pipeline", ["--labeling", "judge", "--judge.model", "{model}"], "judge.model"),
    ("pipeline", ["--labeling", "human", "--k", "17"], "k"),
    ("pipeline", ["--sft.data", ""], "sft.data"),
    ("pipeline", ["--ppo.prompts", ""], "ppo.prompts"),
    ("judge", ["--label_b", "A", "--label_a", "A"], "label_b"),
    ("rm", ["--optim.lrr", "1"], "optim.lrr"),  # unknown options are refused too
    ("ppo", ["--policy_optim", "1"], "policy_optim"),
]  # fmt: skip
"""(command, arguments, the option the error must name): values fine alone that cannot work together."""


class LoaderCalled(Exception):
    """A model, tokenizer or server was about to be loaded or started."""


def _options(cls: type, prefix: str = ""):
    """(dotted option, (class name, field)) for every leaf option of config class ``cls``."""
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            yield from _options(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", (cls.__name__, f.name)


def _cases():
    for command in COMMANDS:
        for option, key in _options(config_class(command)):
            if command == "sample" and option in SAMPLE_ARGS:
                continue  # `fastrlhf sample --out` is its own option (below), not PPOConfig's out
            for bad in BAD.get(key, []):
                yield pytest.param(command, option, bad, key, id=f"{command}-{option}={bad}")
    for option, values in SAMPLE_ARGS.items():
        for bad in values:
            yield pytest.param("sample", option, bad, ("sample", option), id=f"sample-{option}={bad}")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from fastrlhf.judge.verdicts import DEFAULT_TEMPLATE

    root = tmp_path_factory.mktemp("options")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (root / "dir").mkdir()
    (root / "file.txt").write_text("not a template\n")
    (root / "template.txt").write_text(DEFAULT_TEMPLATE)
    records = {
        "demos.jsonl": {"prompt": "p", "completion": "c"},
        "ranks.jsonl": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "prompts.jsonl": {"prompt": "p"},
        "samples.jsonl": {"prompt": "p", "responses": ["a", "b"]},
    }
    for name, record in records.items():
        (root / name).write_text(json.dumps(record) + "\n")
    paths = {name.split(".")[0]: str(root / name) for name in (*records, "template.txt", "file.txt", "dir")}
    return paths | {"root": str(root), "model": str(model)}


def _base(command: str, f: dict[str, str]) -> list[str]:
    """A command line that passes validation (and would then load a model)."""
    suffix = ".jsonl" if command in ("judge", "rank", "sample") else ""
    return ["--out", f"{f['root']}/out-{command}{suffix}"] + {
        "sft": ["--model", f["model"], "--data", f["demos"]],
        "rm": ["--model", f["model"], "--data", f["ranks"]],
        "ppo": ["--policy", f["model"], "--reward_model", f["model"], "--prompts", f["prompts"]],
        "sample": ["--model", f["model"], "--prompts", f["prompts"]],
        "pipeline": ["--sft.model", f["model"], "--sft.data", f["demos"], "--rm.data", f["ranks"],
                     "--ppo.prompts", f["prompts"]],
        "judge": ["--model", f["model"], "--data", f["samples"], "--template", f["template"]],
        "rank": ["--data", f["samples"]],
        "demo": [],
    }[command]  # fmt: skip


@pytest.fixture
def guarded(monkeypatch, files):
    """Loading any model or tokenizer (or serving the ranking page) raises :class:`LoaderCalled`."""

    def called(*args, **kwargs):
        raise LoaderCalled

    for cls in (
        transformers.AutoTokenizer,
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSequenceClassification,
        transformers.PreTrainedModel,
    ):
        monkeypatch.setattr(cls, "from_pretrained", called)
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", called)  # the demo builds its model
    monkeypatch.setattr(fastrlhf.rank, "serve", called)
    monkeypatch.chdir(files["root"])  # relative names resolve in a directory we control
    return files


def _one_line_error(capsys, option: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(rf"(?<![\w.]){re.escape(option)}(?!\w)", lines[0]), f"{option} is not named: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("command,option,bad,key", list(_cases()))
def test_a_bad_value_fails_in_one_line_before_anything_loads(command, option, bad, key, guarded, capsys):
    value = bad.format(**guarded)
    try:
        rc = main([command, *_base(command, guarded), f"--{option}", value])
    except LoaderCalled:
        pytest.fail(f"{command} --{option} {value!r} was accepted: a model was about to load")
    assert rc == 2
    line = _one_line_error(capsys, option)
    if key not in VALUE_NOT_ECHOED:
        shown = {value} | ({repr(float(value))} if re.fullmatch(r"-?[\d.]+|nan|inf", value) else set())
        assert any(s in line for s in shown), f"the value {value!r} is not shown: {line}"


@pytest.mark.parametrize("command,args,option", COMBINATIONS, ids=[" ".join(c[1]) for c in COMBINATIONS])
def test_combinations_that_cannot_work_fail_before_anything_loads(command, args, option, guarded, capsys):
    try:
        rc = main([command, *_base(command, guarded), *[a.format(**guarded) for a in args]])
    except LoaderCalled:
        pytest.fail(f"{command} {' '.join(args)} was accepted: a model was about to load")
    assert rc == 2
    _one_line_error(capsys, option)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_base_command_lines_pass_validation(command, guarded):
    """The control: without the bad value, each command gets as far as loading a model."""
    with pytest.raises(LoaderCalled):
        main([command, *_base(command, guarded)])


def test_every_option_has_a_bad_value():
    options = {key for command in COMMANDS for _, key in _options(config_class(command))}
    missing = sorted(options - set(BAD) - ACCEPTS_ANYTHING)
    assert not missing, f"add a bad value to BAD (or the field to ACCEPTS_ANYTHING) for {missing}"


def test_malformed_yaml_reports_file_and_line(guarded, tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text("epochs: 1\noptim:\n  lr: 1e-5\n   warmup_steps: 3\n")
    assert main(["sft", "--config", str(path)]) == 2
    line = _one_line_error(capsys, str(path))
    assert "line 4" in line and "invalid YAML" in line
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in _one_line_error(capsys, "config")


def test_a_missing_local_model_says_so_without_talking_about_the_internet(guarded, capsys):
    Path("runs").mkdir(exist_ok=True)
    for path in ("runs/sft", "runs/sft/model", "./sft-model", "/no/such/model"):
        assert main(["ppo", *_base("ppo", guarded), "--policy", path]) == 2
        line = _one_line_error(capsys, "policy")
        assert "no such model directory" in line and path in line and "internet" not in line.lower()
    with pytest.raises(LoaderCalled):  # a hub id is not looked up before the run (no network here)
        main(["ppo", *_base("ppo", guarded), "--policy", "Qwen/Qwen2.5-0.5B"])


def test_the_python_api_validates_before_loading(guarded):
    from fastrlhf.demo import DemoConfig, run_demo
    from fastrlhf.judge import judge_file
    from fastrlhf.pipeline import PipelineConfig, run_pipeline, sample_for_labeling
    from fastrlhf.ppo_trainer import train_ppo
    from fastrlhf.rm import train_rm
    from fastrlhf.sft import train_sft

    f = guarded
    ppo = PPOConfig(policy=f["model"], reward_model=f["model"], prompts=f["prompts"])
    sft = SFTConfig(model=f["model"], data=f["demos"])
    replace = dataclasses.replace
    calls = [
        (lambda: train_sft(replace(sft, optim=OptimConfig(lr="1e-5"))), "optim.lr"),
        (lambda: train_sft(replace(sft, data=""), examples=[]), None),
        (lambda: train_rm(RMConfig(model=f["model"], micro_batch_size=0), rankings=[]), "micro_batch_size"),
        (lambda: train_ppo(replace(ppo, temperature=0.0)), "temperature"),
        (lambda: train_ppo(replace(ppo, reward_model=""), reward=len, prompts=["p"]), "reward_model"),
        (lambda: train_ppo(replace(ppo, model_config=ModelConfig(dtype="fp8"))), "model_config.dtype"),
        (lambda: run_pipeline(PipelineConfig(sft=SFTConfig(model=f["model"]), labeling="x")), "labeling"),
        (lambda: run_demo(DemoConfig(rounds=0)), "rounds"),
        (lambda: judge_file(JudgeConfig(data=f["samples"], aggregate="elo"), judge=object()), "aggregate"),
        (lambda: sample_for_labeling(f["model"], f["prompts"], "x.jsonl", k=1), "k"),
    ]  # fmt: skip
    for call, option in calls:
        if option is None:  # in-memory data stands in for the file: validation passes, the loader is next
            with pytest.raises(LoaderCalled):
                call()
            continue
        with pytest.raises(ConfigError, match=rf"^{re.escape(option)}: "):
            call()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_option_with_default_and_docstring(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    cfg = config_class(command)()
    for option, _ in _options(type(cfg)):
        assert re.search(rf"^  --{re.escape(option)} \(default: ", text, re.M), f"--{option} is not listed"
    for cls in {type(_owner(cfg, option)) for option, _ in _options(type(cfg))}:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(getattr(cls(), f.name)):
                assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
                assert docs[f.name].splitlines()[0] in text


def _owner(cfg, option: str):
    *parents, _ = option.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    return cfg
