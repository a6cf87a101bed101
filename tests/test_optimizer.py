"""The training optimizer: fused AdamW on CPU, interchangeable with an unfused one."""

from __future__ import annotations

import io

import torch

from raytrain_vae.config import load_config
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.optim import make_optimizer


def _step(model: ConvVAE, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    p = model(x)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(p.out, x) + p.kl.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def test_cpu_optimizer_is_fused_and_resumes_unfused_state():
    cfg = load_config(None, ["model.channels=[4,8]", "model.latent_dim=2", "train.lr=0.01"])
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.5))
    torch.manual_seed(0)
    unfused_model = ConvVAE(cfg.model, (1, 28, 28))
    fused_model = ConvVAE(cfg.model, (1, 28, 28))
    fused_model.load_state_dict(unfused_model.state_dict())
    unfused = torch.optim.AdamW(unfused_model.parameters(), lr=0.01, weight_decay=0.0)
    fused = make_optimizer(fused_model, cfg, torch.device("cpu"))
    assert fused.defaults["fused"] is True

    # A checkpoint written by an unfused optimizer loads into the fused one, and both then
    # take the same step.
    torch.manual_seed(1)
    _step(unfused_model, unfused, x)
    fused_model.load_state_dict(unfused_model.state_dict())
    saved = io.BytesIO()  # what a checkpoint does: the state goes through torch.save / load
    torch.save(unfused.state_dict(), saved)
    saved.seek(0)
    fused.load_state_dict(torch.load(saved, weights_only=True))
    for model, optimizer in ((unfused_model, unfused), (fused_model, fused)):
        torch.manual_seed(2)
        _step(model, optimizer, x)
    for a, b in zip(unfused_model.parameters(), fused_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
