"""`python -m raytrain_vae`: the one command line (raytrain_vae.commands)."""

from raytrain_vae.commands import cli

cli()
