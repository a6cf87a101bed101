"""`python -m raytrain_vae.train`, kept as an entry point; the module is raytrain_vae.training.

`raytrain_vae.train` is the Python API's function (`raytrain_vae.train(config)`). Importing this
file as a module would replace that function on the package, so only `-m` may run it."""

# "__mp_main__": a multiprocessing child re-importing the main module (spawn, forkserver).
if __name__ not in ("__main__", "__mp_main__"):
    raise ImportError(
        "raytrain_vae.train is a function (raytrain_vae.train(config)); the training module is "
        "raytrain_vae.training (e.g. from raytrain_vae.training import fit)"
    )

from raytrain_vae.training import cli

if __name__ == "__main__":
    cli()
