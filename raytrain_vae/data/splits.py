"""Stable splits of the user's files: each image's split follows from a hash of its path or id,
never from listing order, so splits hold when files are added or read by other workers."""

from __future__ import annotations

import hashlib

import numpy as np

from raytrain_vae.config import DataSection

TRAIN, VAL, TEST, UNUSED = 0, 1, 2, -1
SPLIT_CODES = {"train": TRAIN, "val": VAL, "test": TEST}


def key_hash(key: str) -> int:
    """A 63-bit hash of an image's key (relative path, path#row, or id), the same everywhere."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def unit_interval(hashes: np.ndarray) -> np.ndarray:
    """63-bit hashes -> uniform numbers in [0, 1)."""
    return hashes.astype(np.float64) / 2.0**63


def held_out_fraction(cfg: DataSection) -> float:
    """The fraction of data.path held out for testing: none when data.test_path gives a test set."""
    return 0.0 if cfg.test_path else cfg.test_fraction


def limit_cut(hashes: np.ndarray, cfg: DataSection) -> float:
    """The hash position (within the non-test images, in [0, 1]) below which data.limit keeps
    images: the `limit` non-test images with the smallest hashes. 1.0 keeps all."""
    if cfg.limit is None:
        return 1.0
    position = _non_test_position(unit_interval(hashes), held_out_fraction(cfg))
    kept = np.sort(position[position >= 0])
    return 1.0 if cfg.limit >= len(kept) else float(np.nextafter(kept[cfg.limit - 1], 2.0))


def _non_test_position(u: np.ndarray, test_fraction: float) -> np.ndarray:
    """Where each non-test image falls in [0, 1) among the non-test ones; -1 for test images."""
    return np.where(u < test_fraction, -1.0, (u - test_fraction) / (1.0 - test_fraction))


def split_codes(hashes: np.ndarray, cfg: DataSection, cut: float) -> np.ndarray:
    """TRAIN, VAL, TEST or UNUSED (beyond data.limit) for each image hash.

    Test is the first test_fraction of hash space; of the rest, images past `cut` are unused,
    and the first val_fraction of the kept ones is validation."""
    position = _non_test_position(unit_interval(hashes), held_out_fraction(cfg))
    codes = np.full(len(hashes), TRAIN, dtype=np.int8)
    codes[position < 0] = TEST
    codes[position >= cut] = UNUSED
    codes[(position >= 0) & (position < cut * cfg.val_fraction)] = VAL
    return codes


def binarize_by_hash(images: np.ndarray, hashes: np.ndarray, salt: int) -> np.ndarray:
    """One fixed Bernoulli sample of each uint8 image (N, ...), seeded by its key's hash: the
    same image is binarised alike in memory and in a stream, whatever the order."""
    out = np.empty_like(images)
    for i, (image, h) in enumerate(zip(images, hashes.tolist(), strict=True)):
        rng = np.random.default_rng([int(h), salt])
        out[i] = (rng.random(image.shape) < image / 255.0).astype(np.uint8) * 255
    return out
