"""The `unigrpo` command line: one sub-command per job, each taking CONFIG [key=value ...].

Config errors print one line naming the offending key and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from unigrpo.config import ConfigError, load_config, to_dict

import yaml


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs="?" if not required else None,
                   help="YAML config file (see configs/); omit to use the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. algo.group_size=8 sampler.num_steps=10")


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    a = cfg.algo
    print(f"ok: {args.config} ({a.prompts_per_step} prompts x {a.group_size} trajectories = "
          f"{a.prompts_per_step * a.group_size} trajectories per step)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unigrpo",
        description="UniGRPO: RL post-training of unified reason-then-draw models "
                    "(GRPO on reasoning tokens + FlowGRPO on flow-matching steps).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("validate", help="check a config (types, unknown keys, combinations) without running it")
    _add_config_args(p)
    p.add_argument("--print", action="store_true", help="print the fully resolved config as YAML")
    p.set_defaults(func=cmd_validate)
    return parser


def _overrides_from(args: argparse.Namespace) -> None:
    """Allow `unigrpo cmd key=value` with no config file: a first positional with '=' is an override."""
    cfg = getattr(args, "config", None)
    if cfg is not None and "=" in cfg and not cfg.endswith((".yaml", ".yml")):
        args.overrides = [cfg, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _overrides_from(args)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"unigrpo: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
