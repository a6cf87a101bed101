"""What a model's latents do: KL per level and per latent group, and active units (Burda et al.
2016: a unit whose posterior mean varies across the data with variance above 0.01), also
conditionally: the posterior mean less the prior mean given the levels above, whose variance
says whether a lower unit carries the image's information or only follows the levels above."""

from __future__ import annotations

from typing import Any

import torch

from raytrain_vae.models import VAE

ACTIVE_VARIANCE = 0.01


class UnitActivity:
    """Running mean and variance over images of every unit's posterior mean, level by level."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: list[torch.Tensor] = []
        self.squares: list[torch.Tensor] = []

    def add(self, means: list[torch.Tensor]) -> None:
        """One batch: each level's posterior means, (B, units)."""
        if not self.sums:
            self.sums = [torch.zeros(m.shape[1], dtype=torch.float64) for m in means]
            self.squares = [torch.zeros(m.shape[1], dtype=torch.float64) for m in means]
        for i, m in enumerate(means):
            m = m.detach().double().cpu()
            self.sums[i] += m.sum(dim=0)
            self.squares[i] += m.pow(2).sum(dim=0)
        self.count += len(means[0])

    def variances(self) -> list[torch.Tensor]:
        """Each unit's variance over the images seen (the population variance)."""
        n = max(self.count, 1)
        pairs = zip(self.sums, self.squares, strict=True)
        return [(q / n - (s / n).pow(2)).clamp(min=0) for s, q in pairs]

    def active(self) -> list[int]:
        """Active units per level."""
        return [int((v > ACTIVE_VARIANCE).sum()) for v in self.variances()]


def group_sizes(model: VAE) -> list[int]:
    """Latent groups per level: the top's (one per dimension, or one under a mixture prior),
    then each lower level's channels."""
    return [model.top_groups, *(c for c, _, _ in getattr(model, "level_shapes", []))]


def latent_diagnostics(
    model: VAE, kl_per_group: torch.Tensor, activity: UnitActivity, shifts: UnitActivity
) -> dict[str, Any]:
    """KL per level and per group (nats per image), and active units out of each level's units,
    plain (activity: of the posterior means) and conditional (shifts: of the means less the
    prior means)."""
    names = list(model.level_names)
    per_level = kl_per_group.split(group_sizes(model))
    units = [len(s) for s in activity.sums]
    kl = dict(zip(names, per_level, strict=True))
    return {
        "kl_per_level": {n: float(k.sum()) for n, k in kl.items()},
        "kl_per_group": {n: [round(float(v), 4) for v in k] for n, k in kl.items()},
        "active_units": {n: a for n, a in zip(names, activity.active(), strict=True)},
        "conditional_active_units": dict(zip(names, shifts.active(), strict=True)),
        "units": {n: u for n, u in zip(names, units, strict=True)},
    }
