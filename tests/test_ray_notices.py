"""Ray's own notices in healthy runs are skipped by our drivers; everything else still shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from raytrain_vae.ray_notices import SKIP_REGEX_VAR, skip_known_ray_notices, skip_regex

REPO = Path(__file__).resolve().parents[1]
# As Ray 2.60 printed them on a search of 2-worker trials.
PREEMPTION = (
    "[2026-12-01 03:09:03,524 E 25622 25681] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '46e69254d63d7b4adbd15cbc01000000' has constructor arguments "
    "in the object store and max_restarts > 0. If the arguments in the object store go out of "
    "scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)
CLEANER = (
    "Detected that the Ray Train controller actor (c6ddeb49a725fb510eca1bab01000000) is dead. "
    "Cleaning up placement group = [PlacementGroupID(3703afb132d5058457bf819e19e201000000)] "
    "created by this run."
)
KEPT = (
    "[2026-12-01 03:09:03,524 E 25622 25681] core_worker.cc:2465: Actor with class name: "
    "'RayTrainWorker' and ID: '46e6' has constructor arguments in the object store",
    "Traceback (most recent call last):",
    "trial c64ae648: epoch 1/2  train_loss 522.00",
    "Failed to clean up placement group: timed out",
)


def test_the_regex_skips_the_two_notices_and_nothing_else():
    regex = re.compile(skip_regex(None))
    assert regex.search(PREEMPTION) and regex.search(CLEANER)
    for line in KEPT:
        assert not regex.search(line), line


def test_a_users_own_skip_regex_keeps_working_and_ours_is_added_once():
    env = {SKIP_REGEX_VAR: "my noisy line"}
    skip_known_ray_notices(env)
    skip_known_ray_notices(env)
    regex = re.compile(env[SKIP_REGEX_VAR])
    assert regex.search("a my noisy line") and regex.search(PREEMPTION)
    assert env[SKIP_REGEX_VAR].count("PreemptionWatcher") == 1


ACTOR_SCRIPT = f"""
import sys
import raytrain_vae  # before ray, as every entry point of ours
import ray

@ray.remote(num_cpus=0)
class Noisy:
    def say(self):
        print({PREEMPTION!r}, file=sys.stderr, flush=True)
        print({CLEANER!r}, flush=True)
        print("a line of the run", file=sys.stderr, flush=True)

ray.init(num_cpus=1)
actor = Noisy.remote()
ray.get(actor.say.remote())
import time; time.sleep(5)  # the log monitor forwards lines within a second; a busy CI is slower
ray.shutdown()
"""


@pytest.mark.slow
def test_a_driver_that_imported_the_package_skips_the_notices_of_its_actors(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", ACTOR_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "a line of the run" in out, out[-3000:]
    assert "PreemptionWatcher" not in out and "Cleaning up placement group" not in out
