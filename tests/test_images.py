"""PNG pictures of a model: interpolation endpoints, 2-D latent map, and the images CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import grid_pixels, make_idx_dataset, tiny_config, write_model_dir
from PIL import Image

from raytrain_vae.images import interpolation_grid, latent_map, main, reconstruction_grid
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.outputs import MARKER
from raytrain_vae.pictures import MIN_WIDTH, TITLE_BAND


def tiny_model(latent_dim: int) -> ConvVAE:
    cfg = tiny_config("model.hidden_dim=16", f"model.latent_dim={latent_dim}")
    torch.manual_seed(0)
    return ConvVAE(cfg.model, (1, 28, 28)).eval()


def grid_tiles(path, rows: int, cols: int, left: int = 0) -> np.ndarray:
    """Split a titled, upscaled torchvision grid (padding 2) back into (rows, cols, 28, 28)
    uint8 tiles: below the title band, right of the row labels, one pixel per upscaled block."""
    picture = np.asarray(Image.open(path).convert("L"))
    scale = max(1, math.ceil(MIN_WIDTH / (cols * 30 + 2)))
    a = picture[TITLE_BAND:, left:][::scale, ::scale]
    assert a.shape == (rows * 30 + 2, cols * 30 + 2)
    return np.stack(
        [
            [a[2 + r * 30 : r * 30 + 30, 2 + c * 30 : c * 30 + 30] for c in range(cols)]
            for r in range(rows)
        ]
    )


def test_interpolation_starts_and_ends_at_the_reconstructions(tmp_path):
    model = tiny_model(4)
    x = torch.rand(4, 1, 28, 28)
    interpolation_grid(model, [(x[0], x[1]), (x[2], x[3])], tmp_path / "i.png", steps=5)
    tiles = grid_tiles(tmp_path / "i.png", rows=2, cols=5)
    recon = (model.reconstruct(x).clamp(0, 1) * 255).round().squeeze(1).numpy()
    for row, (a, b) in enumerate([(0, 1), (2, 3)]):
        assert np.abs(tiles[row, 0].astype(int) - recon[a]).max() <= 1
        assert np.abs(tiles[row, -1].astype(int) - recon[b]).max() <= 1


def test_latent_map_needs_two_latent_dims_and_tiles_the_plane(tmp_path):
    with pytest.raises(ValueError, match="latent_dim == 2"):
        latent_map(tiny_model(3), tmp_path / "no.png")
    model = tiny_model(2)
    latent_map(model, tmp_path / "map.png", size=4, span=1.0)
    tiles = grid_tiles(tmp_path / "map.png", rows=4, cols=4)
    # Top-left tile is z = (-1, +1): the grid's y axis grows upwards.
    expected = model.mean_image(model.decode(torch.tensor([[-1.0, 1.0]]))).detach()
    assert np.abs(tiles[0, 0].astype(int) - (expected * 255).round().squeeze().numpy()).max() <= 1


def test_images_cli_writes_every_picture(tmp_path, capsys):
    written = make_idx_dataset(n_train=40, n_test=32, height=28, width=28)
    written.write(tmp_path / "data")
    cfg = tiny_config(
        "data.source=mnist", f"data.root={tmp_path / 'data'}", "data.download=false",
        "model.hidden_dim=16",
    )  # fmt: skip
    write_model_dir(tmp_path, cfg)
    assert (
        main(["--model", str(tmp_path), "--output", str(tmp_path / "png"), "--num-samples", "9"])
        == 0
    )
    names = {p.name for p in (tmp_path / "png").iterdir()}
    assert names == {
        "samples.png",
        "reconstructions.png",
        "interpolations.png",
        "latent_map.png",
        MARKER,
    }
    assert grid_pixels(tmp_path / "png" / "samples.png", 3 * 30 + 2).shape == (92, 92)
    err = capsys.readouterr().err  # progress: one line per picture drawn
    assert [line.split(" (")[0] for line in err.splitlines()] == [
        f"images: {i}/4 pictures drawn" for i in range(1, 5)
    ]


def dark(region: np.ndarray) -> bool:
    """Whether a white region holds anything drawn (text)."""
    return bool((region < 128).any())


def test_pictures_are_large_titled_and_their_rows_labelled(tmp_path):
    cfg = tiny_config("model.hidden_dim=16")
    torch.manual_seed(0)
    model = ConvVAE(cfg.model, (3, 32, 32)).eval()  # RGB
    x = torch.rand(20, 3, 32, 32)  # two blocks of input + reconstruction rows
    reconstruction_grid(model, x, tmp_path / "r.png", "my title", "input (binarized)")
    picture = Image.open(tmp_path / "r.png")
    assert picture.mode == "RGB" and picture.width >= MIN_WIDTH
    a = np.asarray(picture.convert("L"))
    assert dark(a[:TITLE_BAND, : picture.width // 2])  # the title
    assert not dark(a[:TITLE_BAND, -40:])  # and nothing else in its band
    grid_left = int(np.argmax(a[TITLE_BAND + 5] < 128))  # the grid's black padding begins
    assert grid_left > 60  # room for the labels
    rows = 4
    row_height = (a.shape[0] - TITLE_BAND) / rows
    for row in range(rows):  # each row's label, left of the grid
        middle = int(TITLE_BAND + (row + 0.5) * row_height)
        assert dark(a[middle - 6 : middle + 6, : grid_left - 4]), row
