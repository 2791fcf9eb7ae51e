"""`fastrlhf sft | rm | ppo | pipeline | sample | judge | rank | demo`: a YAML config plus `--dotted.option
value` overrides.

Examples::

    fastrlhf sft --config sft.yaml --optim.lr 1e-5
    fastrlhf ppo --policy runs/sft/model --reward_model runs/rm/model --prompts prompts.jsonl --kl_coef 0.02
    fastrlhf sample --model runs/ppo/policy --prompts new.jsonl --k 4 --out to_rank.jsonl
    fastrlhf rank --data to_rank.jsonl --out rankings.jsonl
    fastrlhf judge --model Qwen/Qwen2.5-7B-Instruct --data to_rank.jsonl --out rankings.jsonl
    fastrlhf demo --out demo_out
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from fastrlhf.checkpoint import NonFiniteLossError
from fastrlhf.config import PPOConfig, RMConfig, SFTConfig, field_docs, load_config, show_value

COMMANDS = {
    "sft": "supervised fine-tuning on prompt/completion demonstrations",
    "rm": "reward model from pairwise or K-way rankings",
    "ppo": "PPO with a critic and a per-token KL penalty",
    "pipeline": "SFT -> RM -> PPO, plus further RM/PPO rounds on new comparisons",
    "sample": "write K samples per prompt from a model, for labelers to rank",
    "judge": "rank `sample` output with a local LLM judge (both orders, answer-token log-probs)",
    "demo": "the whole pipeline on a toy task with a known gold reward, nothing downloaded",
    "rank": "a ranking page on localhost for people to rank `sample` output (--report: their agreement)",
}


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--a.b value`` / ``--a.b=value`` pairs; values are parsed as YAML scalars (1e-5, true, null, ...)."""
    import yaml

    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise SystemExit(f"error: expected an option like --name value, got {token!r}")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens):
            key, value = token[2:], tokens[i + 1]
            i += 2
        else:
            raise SystemExit(f"error: option {token} needs a value")
        try:
            overrides[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:  # not a YAML scalar (an unclosed bracket, say): the text itself
            overrides[key] = value
    return overrides


def config_class(command: str) -> type:
    """The config dataclass of a command (imported on demand: some pull in the whole trainer)."""
    if command == "demo":
        from fastrlhf.demo import DemoConfig

        return DemoConfig
    if command == "pipeline":
        from fastrlhf.pipeline import PipelineConfig

        return PipelineConfig
    if command == "rank":
        from fastrlhf.rank import RankConfig

        return RankConfig
    if command == "judge":
        from fastrlhf.config import JudgeConfig

        return JudgeConfig
    return {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "sample": PPOConfig}[command]


def _options_help(cfg: Any, prefix: str = "", *, docs: bool = False) -> list[str]:
    """Every option of config object ``cfg`` with its default (and, with ``docs``, its docstring)."""
    lines = []
    field_doc = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        default = getattr(cfg, f.name)
        if dataclasses.is_dataclass(default):
            if docs:
                about = field_doc.get(f.name) or (type(default).__doc__ or "").strip()
                lines.append(f"  {prefix}{f.name}.*: {' '.join(about.split())}")
            lines += _options_help(default, f"{prefix}{f.name}.", docs=docs)
            continue
        lines.append(f"  --{prefix}{f.name} (default: {show_value(default)})")
        if docs and f.name in field_doc:
            lines += [f"        {line}" if line else "" for line in field_doc[f.name].splitlines()]
    return lines


_Formatter = argparse.RawDescriptionHelpFormatter  # keeps the docstrings' own line breaks


class _CommandParser(argparse.ArgumentParser):
    """A command's parser whose --help also lists the config options, built only when help is asked for."""

    def __init__(self, *args: Any, command: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command = command

    def format_help(self) -> str:
        if self.command is not None and self.epilog is None:
            options = _options_help(config_class(self.command)(), docs=True)
            self.epilog = (
                "config options: --name value (dotted for nested options; values are read as YAML scalars),\n"
                "or the same names as a mapping in the --config YAML file:\n" + "\n".join(options)
            )
        return super().format_help()


def _rank() -> int:
    """This process's rank under torchrun (read before the job is joined), 0 alone."""
    return int(os.environ.get("RANK", "0"))


def _say(text: str) -> None:
    """A result line on stdout, from rank 0 alone under torchrun."""
    if _rank() == 0:
        print(text)


def _error(e: BaseException) -> None:
    print(f"error: {e}" if _rank() == 0 else f"error (rank {_rank()}): {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Under torchrun the other ranks log warnings only: rank 0's log says what every rank does.
    level = logging.INFO if _rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import transformers

    # Loading a causal LM as a scalar-head model reports its new head at length; our logs say what matters.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(prog="fastrlhf", description="InstructGPT-style RLHF on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, command=name, formatter_class=_Formatter)
        p.add_argument("--config", help="YAML file of options (a mapping of this command's fields)")
        p.add_argument("--list-options", action="store_true", help="print every option and its default")
        if name == "pipeline":
            p.add_argument("--more-rankings", nargs="*", default=[], help="ranking files for further rounds")
        if name == "sample":
            p.add_argument("--model", required=True, help="model directory to sample from")
            p.add_argument("--prompts", required=True, help="prompt file (JSONL or .txt)")
            p.add_argument("--out", required=True, help="output JSONL of prompt/responses")
            p.add_argument("--k", type=int, default=4, help="responses per prompt")
        if name == "rank":
            p.add_argument("--report", action="store_true", help="print inter-labeler agreement of --out")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)

    cls = config_class(args.command)
    if args.list_options:
        print("\n".join(_options_help(cls())))
        return 0
    try:  # a bad option is reported here, in one line, before any model or data is loaded
        cfg = load_config(cls, args.config, overrides)
        _validate(args, cfg)
    except (ValueError, OSError) as e:
        _error(e)
        return 2

    try:
        return _run(args, cfg)
    # Bad input, a missing optional package (the ranking server, `datasets`) or a diverged run: say what.
    except (ValueError, OSError, ImportError, NonFiniteLossError) as e:
        _error(e)
        return 1


def _validate(args: argparse.Namespace, cfg) -> None:
    """Every option of the command (the Python API checks the same again before it loads anything)."""
    if args.command == "sample":
        from fastrlhf.pipeline import check_sample_options

        check_sample_options(args.model, args.prompts, args.out, args.k, cfg)
    elif args.command == "rank":
        cfg.validate(provided=("data",) if args.report else ())  # the report reads --out alone
    else:
        cfg.validate()


def _run(args: argparse.Namespace, cfg) -> int:
    if args.command == "sft":
        from fastrlhf.sft import train_sft

        _say(f"model saved to {train_sft(cfg)[2]}")
    elif args.command == "rm":
        from fastrlhf.rm import train_rm

        _, _, path, accuracy = train_rm(cfg)
        _say(f"reward model saved to {path}; held-out pairwise accuracy {accuracy:.3f}")
    elif args.command == "ppo":
        from fastrlhf.ppo_trainer import train_ppo

        _say(f"policy saved to {train_ppo(cfg)[1] / 'policy'}")
    elif args.command == "pipeline":
        from fastrlhf.pipeline import run_pipeline

        _say(json.dumps(run_pipeline(cfg, more_rankings=args.more_rankings), indent=2))
    elif args.command == "rank":
        from fastrlhf.rank import run_rank

        return run_rank(cfg, show_report=args.report)
    elif args.command == "judge":
        from fastrlhf.judge import judge_file

        _say(f"rankings written to {judge_file(cfg)[0]}")
    elif args.command == "sample":
        from fastrlhf.pipeline import sample_for_labeling

        _say(f"wrote {sample_for_labeling(args.model, args.prompts, args.out, k=args.k, ppo=cfg)}")
    else:
        from fastrlhf.demo import run_demo

        summary = run_demo(cfg)
        lines = [f"gold reward of the SFT policy: {summary['reward_sft']:.3f}"]
        for i, r in enumerate(summary["rounds"], start=1):
            lines.append(
                f"round {i}: reward model held-out accuracy {r['rm_accuracy']:.3f}, "
                f"gold reward after PPO {r['reward_ppo']:.3f}, KL to the SFT model {r['kl']:.3f} nats"
            )
        lines.append(f"outputs in {cfg.out}/ (summary.json, metrics.jsonl, curves.png)")
        _say("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
