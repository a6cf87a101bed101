"""`python -m raytrain_vae.evaluate`, kept as an entry point; the module is
raytrain_vae.evaluation.

`raytrain_vae.evaluate` is the Python API's function (`raytrain_vae.evaluate(model)`). Importing
this file as a module would replace that function on the package, so only `-m` may run it."""

# "__mp_main__": a multiprocessing child re-importing the main module (spawn, forkserver).
if __name__ not in ("__main__", "__mp_main__"):
    raise ImportError(
        "raytrain_vae.evaluate is a function (raytrain_vae.evaluate(model)); the evaluation "
        "module is raytrain_vae.evaluation (e.g. from raytrain_vae.evaluation import evaluate)"
    )

from raytrain_vae.evaluation import cli

if __name__ == "__main__":
    cli()
