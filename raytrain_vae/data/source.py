"""What every data source provides: its image shape, its size, and its images as uint8 tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from raytrain_vae.config import DataSection, UserError


class DataError(UserError):
    """The dataset cannot be found, downloaded or read."""


@dataclass(frozen=True)
class RawData:
    """A source's training and test splits as read: uint8 (N, C, H, W) images and labels."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    where: str  # the folder or URI the images came from, for messages


@dataclass(frozen=True)
class DataSource:
    """One data.source: image shape and training-split size known before reading, `ensure`
    (make the files present, e.g. download them, once per machine) and `read`."""

    image_shape: tuple[int, int, int]
    train_split_images: int
    ensure: Callable[[DataSection], Any]
    read: Callable[[DataSection], RawData]
