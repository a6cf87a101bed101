"""Training-step time of configs side by side in one process, interleaved round by round, so a
machine whose speed drifts slows every config alike: the drift-proof check of an epoch-time ratio
measured across separate runs (benchmarks/quality.py).

    python benchmarks/step_time.py configs/vae.yaml configs/hierarchical.yaml
    python benchmarks/step_time.py --rounds 8 configs/vae.yaml configs/hierarchical.yaml

Each config's step is the workers' own (`raytrain_vae.loop.train_step`: its batch per worker,
threads per worker, memory format, autocast, optimizer and heap setting) on random binary images
of the config's data's shape, without the all-reduce. A round times a few steps of every config in
turn; each config keeps its fastest round. Ratios are against the first config.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from raytrain_vae.checkpoint import TrainState
from raytrain_vae.cli import run_cli
from raytrain_vae.config import Config, load_config
from raytrain_vae.data import image_shape
from raytrain_vae.loop import RankRun, memory_format_for, train_step
from raytrain_vae.models import build_model
from raytrain_vae.optim import make_optimizer
from raytrain_vae.perf.heap import retain_freed_memory


def worker_threads(cfg: Config) -> int:
    """The intra-op threads of one CPU worker (as raytrain_vae.worker sets them)."""
    return max(1, int(cfg.scaling.cpus_per_worker))


def step_function(cfg: Config, shape: tuple[int, int, int]) -> Callable[[], None]:
    """One worker's training step of cfg's model on a fixed batch of random binary images."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, shape).to(memory_format=memory_format_for(cfg))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    batch = cfg.train.batch_size // cfg.scaling.num_workers
    x = torch.bernoulli(torch.full((batch, *shape), 0.3))
    x = x.to(memory_format=memory_format_for(cfg))
    n_train = batch * cfg.scaling.num_workers * 100  # the schedule's length: any will do
    run = RankRun(cfg, model, model, optimizer, None, None, False, world=cfg.scaling.num_workers)
    run.n_train = n_train  # a cached property: set, it needs no images
    state = TrainState()
    return lambda: train_step(run, state, x)


def interleaved_step_ms(
    steps: dict[str, Callable[[], None]], threads: dict[str, int], rounds: int, per_round: int
) -> dict[str, float]:
    """Each step's fastest mean time (ms) over `rounds` rounds of `per_round` calls, the steps
    taking turns within every round (after two warm-up calls each)."""
    for name, step in steps.items():
        torch.set_num_threads(threads[name])
        step(), step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            torch.set_num_threads(threads[name])
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / per_round * 1000)
    return best


def compare_step_times(configs: dict[str, Config], rounds: int, per_round: int) -> dict[str, float]:
    """{name: fastest step ms} of the configs, interleaved, each on its data's image shape; the
    heap set as the workers set it."""
    if any(cfg.scaling.retain_freed_memory for cfg in configs.values()):
        retain_freed_memory()
    steps = {name: step_function(cfg, image_shape(cfg.data)) for name, cfg in configs.items()}
    threads = {name: worker_threads(cfg) for name, cfg in configs.items()}
    before = torch.get_num_threads()
    try:
        return interleaved_step_ms(steps, threads, rounds, per_round)
    finally:
        torch.set_num_threads(before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config files or names; the first is the base")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps of each config per round")
    args = parser.parse_args()
    configs = {path: load_config(path) for path in args.configs}
    times = compare_step_times(configs, args.rounds, args.steps)
    base = times[args.configs[0]]
    for name, ms in times.items():
        print(f"{name}: {ms:.1f} ms a step ({ms / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a config error: one line and exit status 2
