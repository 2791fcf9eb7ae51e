"""``python -m fastrlhf.rank``: the same as ``fastrlhf rank``, without loading the training stack."""

from __future__ import annotations

import argparse
import sys

from fastrlhf.rank import RankConfig, run_rank


def main(argv: list[str] | None = None) -> int:
    from fastrlhf.cli import parse_overrides
    from fastrlhf.config import load_config

    parser = argparse.ArgumentParser(prog="python -m fastrlhf.rank", description=RankConfig.__doc__)
    parser.add_argument("--config", help="YAML file of options")
    parser.add_argument("--report", action="store_true", help="print inter-labeler agreement of --out")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(RankConfig, args.config, parse_overrides(rest))
        return run_rank(cfg, show_report=args.report)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
