"""Shared command-line plumbing: config path + key.sub=value overrides; user errors -> exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from raytrain_vae.config import Config, UserError, load_config


def config_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argparse parser taking a YAML config path and any number of overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=(description or "").strip() or None)
    parser.add_argument("config", help="YAML config file (see configs/ and the README)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override a config value, e.g. train.lr=3e-4",
    )
    return parser


def config_from_args(argv: list[str] | None, prog: str, description: str | None = None) -> Config:
    """Parse argv into a validated Config (raises ConfigError on bad input)."""
    args = config_parser(prog, description).parse_args(argv)
    return load_config(args.config, args.overrides)


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI entry point: a UserError becomes one line on stderr and exit status 2."""
    try:
        return main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
