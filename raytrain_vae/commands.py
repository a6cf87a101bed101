"""The one command line, `raytrain-vae` (also `python -m raytrain_vae`): a subcommand per job,
each the same as its `python -m raytrain_vae.<module>` entry point."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from raytrain_vae.cli import HelpFormatter, config_parser, run_cli
from raytrain_vae.config import config_keys, dump_config, load_config
from raytrain_vae.version import __version__

PROG = "raytrain-vae"
COMMANDS = {  # name -> (module with main(argv, prog), what it does)
    "train": ("raytrain_vae.training", "train one VAE with Ray Train (DDP) from a config"),
    "tune": ("raytrain_vae.tune", "search hyperparameters (Ray Tune + Optuna), export the best"),
    "generate": ("raytrain_vae.generate", "Ray Data batch jobs: sample, reconstruct, encode"),
    "evaluate": ("raytrain_vae.evaluation", "negative ELBO, IWAE bound and bits/dim of an export"),
    "images": ("raytrain_vae.images", "PNG pictures of an export: samples, reconstructions, ..."),
    "config": ("raytrain_vae.commands", "print a resolved config, or every key (--schema)"),
}
EXAMPLES = """examples:
  raytrain-vae tune quickstart                     # the shipped quickstart search
  raytrain-vae train vae train.epochs=20           # key.sub=value overrides any config key
  raytrain-vae generate sample --model exports/quickstart --num-samples 1000 --output samples
  raytrain-vae config quickstart train.lr=1e-3     # the config a command would run
  raytrain-vae config --schema                     # every key, its default and meaning

`raytrain-vae COMMAND --help` describes a command."""


CONFIG_EXAMPLES = """examples:
  raytrain-vae config quickstart train.lr=1e-3 > my_search.yaml
  raytrain-vae config --schema | grep -A3 '^data.ingest'"""


def top_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Variational autoencoders on Ray: train, search, export, generate.",
        epilog=f"commands:\n{commands}\n\n{EXAMPLES}",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="see below")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Dispatch to a command's own main with the rest of the arguments; `config` runs here."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv)  # --help, --version, or a usage error (exit 2)
        return 2
    name, rest = argv[0], argv[1:]
    if name == "config":
        return config_main(rest, f"{prog or PROG} config")
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"{prog or PROG} {name}")


def config_main(argv: list[str], prog: str) -> int:
    """`config [CONFIG] [key.sub=value ...]`: the resolved YAML; `config --schema`: every key."""
    parser = config_parser(
        prog,
        "Print the fully resolved config (every key) as YAML: the defaults, a config file or a "
        "shipped config's name, and overrides.",
        CONFIG_EXAMPLES,
        config_optional=True,
    )
    parser.add_argument("--schema", action="store_true", help="print every key, its meaning")
    args = parser.parse_args(argv)
    if args.schema:
        print(schema_text())
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def schema_text(width: int = 100) -> str:
    """Every config key: its default, then its meaning, wrapped."""
    lines = []
    for key, default, description in config_keys():
        lines.append(f"{key} = {default}")
        lines += textwrap.wrap(description, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))
