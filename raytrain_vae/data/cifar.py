"""CIFAR-10: torchvision downloads the archive and checks its MD5; an extracted folder is read
with an unpickler that admits numpy arrays only."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from raytrain_vae.config import DataSection
from raytrain_vae.data.source import DataError, DataSource, RawData

# The layout of the archive from https://www.cs.toronto.edu/~kriz/cifar.html, which
# torchvision's CIFAR10 downloads and extracts. torchvision is imported only to download: it
# slows the start-up of every process that imports this module otherwise (docs/performance.md).
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
IMAGES_PER_FILE = 10_000
# What a CIFAR batch file may ask the unpickler for: numpy's array reconstruction, nothing else.
# Python 3 pickles an array's bytes through _codecs.encode at protocol 2, and the array through
# numeric._frombuffer at protocol 5 (its default): conversions that run nothing else.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists and numpy arrays, and refuses any other class: a
    batch file from elsewhere cannot run code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's own signature)
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def folder(cfg: DataSection) -> Path:
    return Path(cfg.root).expanduser() / FOLDER


def ensure(cfg: DataSection) -> Path:
    """The extracted folder, downloading (and MD5-checking) the archive first if allowed."""
    where = folder(cfg)
    if all((where / name).is_file() for name in TRAIN_FILES + TEST_FILES):
        return where
    if not cfg.download:
        raise DataError(
            f"cifar10 not found in {where} (data.download is false); put the extracted "
            f"{FOLDER} folder under data.root, or set data.download=true with internet access"
        )
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(Path(cfg.root).expanduser()), train=True, download=True)
    except Exception as exc:  # offline, DNS, checksum mismatch: all mean "not available"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise DataError(f"cifar10: download to {where} failed ({reason})") from None
    return where


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels) of one batch file."""
    try:
        with path.open("rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise DataError(f"{path}: not a CIFAR-10 batch file ({reason})") from None
    if len(data) != len(labels):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def read(cfg: DataSection) -> RawData:
    where = ensure(cfg)
    train = [_read_batch(where / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(where / TEST_FILES[0])
    return RawData(
        train=torch.from_numpy(np.concatenate([t[0] for t in train])),
        train_labels=torch.from_numpy(np.concatenate([t[1] for t in train])),
        test=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels),
        where=str(where),
    )


CIFAR_SOURCE = DataSource(
    image_shape=(3, 32, 32),
    train_split_images=len(TRAIN_FILES) * IMAGES_PER_FILE,
    ensure=ensure,
    read=read,
)
