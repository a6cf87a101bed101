"""MNIST / Fashion-MNIST: find or download, decode once to uint8 tensors, split, shard, binarize."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from raytrain_vae.config import Config, ConfigError, DataConfig, UserError, stream_seed

DATASETS: dict[str, type[MNIST]] = {"mnist": MNIST, "fashion_mnist": FashionMNIST}
IMAGE_SHAPE = (1, 28, 28)  # (C, H, W) of every dataset above
TRAIN_SPLIT_IMAGES = {"mnist": 60_000, "fashion_mnist": 60_000}
# Distribution packages that ship the IDX files (Debian: `apt-get install dataset-fashion-mnist`).
SYSTEM_DIRS: dict[str, list[str]] = {
    "mnist": ["/usr/share/datasets/mnist"],
    "fashion_mnist": ["/usr/share/datasets/fashion-mnist"],
}
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# The validation split and the fixed binarization of evaluation images must not move when a
# trial changes train.seed, or trials would be compared on different data.
SPLIT_SEED = 20240607
EVAL_BINARIZE_SEED = 7


class DataError(UserError):
    """The dataset cannot be found, downloaded or read."""


@dataclass(frozen=True)
class Splits:
    """uint8 image tensors (N, C, H, W) with labels; val is held out from the training split."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    dynamic_binarize: bool
    source: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


def candidate_dirs(cfg: DataConfig) -> list[Path]:
    """Folders searched, in order: torchvision's layout under root, root itself, system copies."""
    root = Path(cfg.root).expanduser()
    raw = root / DATASETS[cfg.dataset].__name__ / "raw"
    return [raw, root, *(Path(d) for d in SYSTEM_DIRS[cfg.dataset])]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def locate_files(cfg: DataConfig) -> dict[str, Path] | None:
    """The first folder holding all four IDX files (plain or .gz), or None."""
    for folder in candidate_dirs(cfg):
        found = {key: _find(folder, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _download(cfg: DataConfig) -> None:
    cls = DATASETS[cfg.dataset]
    root = Path(cfg.root).expanduser()
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as exc:  # offline, DNS, checksum, permissions: all mean "not available"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(_missing_message(cfg, f"download failed: {reason}")) from None


def _missing_message(cfg: DataConfig, why: str) -> str:
    looked = ", ".join(str(d) for d in candidate_dirs(cfg))
    fix = (
        "set data.download=true with internet access, or put the four IDX files "
        f"({', '.join(FILES.values())}, optionally .gz) in {candidate_dirs(cfg)[0]}"
    )
    if cfg.dataset == "fashion_mnist":
        fix += ", or apt-get install dataset-fashion-mnist"
    return f"{cfg.dataset} not found ({why}); looked in {looked}; fix: {fix}"


def _read_idx(path: Path, reader, cache_dir: Path) -> torch.Tensor:
    """Read an IDX file with torchvision's reader, decompressing .gz into the cache once."""
    if path.suffix != ".gz":
        return reader(str(path))
    target = cache_dir / path.stem
    if target.is_file():
        return reader(str(target))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.stem}.")
    except OSError:  # read-only root: decompress to a throwaway file instead
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.")
        target = None
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, out)
        if target is None:
            return reader(tmp)
        os.replace(tmp, target)  # atomic: concurrent workers on one node never see half a file
        return reader(str(target))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bernoulli_u8(images: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images.float() / 255, generator=g).to(torch.uint8) * 255


def check_split_fits(cfg: Config) -> None:
    """Refuse, before Ray starts, a validation fraction that leaves a worker no training image
    (data.limit is checked with the config; this covers the whole training split)."""
    n_train, _ = cfg.data.split_sizes(TRAIN_SPLIT_IMAGES[cfg.data.dataset])
    if n_train < cfg.scaling.num_workers:
        raise ConfigError(
            f"data.val_fraction={cfg.data.val_fraction:g} leaves {n_train} training image(s) of "
            f"{cfg.data.dataset}, fewer than scaling.num_workers={cfg.scaling.num_workers}"
        )


def ensure_files(cfg: DataConfig) -> dict[str, Path]:
    """The dataset's four IDX files, downloading them first if allowed and not found."""
    files = locate_files(cfg)
    if files is None:
        if not cfg.download:
            raise DataError(_missing_message(cfg, "data.download is false"))
        _download(cfg)
        files = locate_files(cfg)
        if files is None:
            raise DataError(_missing_message(cfg, "download left no files"))
    return files


def load_splits(cfg: DataConfig) -> Splits:
    """Find (or download) the dataset and return train/val/test as uint8 (N, C, H, W) tensors."""
    files = ensure_files(cfg)
    cache = candidate_dirs(cfg)[0]
    try:
        arrays = {
            key: _read_idx(path, read_label_file if "labels" in key else read_image_file, cache)
            for key, path in files.items()
        }
    # torchvision's reader asserts on a malformed header (an HTML error page saved as IDX).
    except (OSError, EOFError, TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise DataError(
            f"cannot read {cfg.dataset} from {files['train_images'].parent}: {exc}"
        ) from None

    train_all = arrays["train_images"].unsqueeze(1)
    labels_all = arrays["train_labels"].long()
    test, test_labels = arrays["test_images"].unsqueeze(1), arrays["test_labels"].long()
    if len(train_all) != len(labels_all) or len(test) != len(test_labels):
        raise DataError(f"{files['train_images'].parent}: image and label counts differ")

    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train, n_val = cfg.split_sizes(len(order))
    if n_train < 1:
        raise DataError(
            f"{min(len(order), cfg.limit or len(order))} images (data.limit={cfg.limit}) leave "
            "no training images after data.val_fraction"
        )
    val_idx, train_idx = order[:n_val], order[n_val : n_val + n_train]
    train, val = train_all[train_idx], train_all[val_idx]

    if cfg.binarize == "static":
        train = _bernoulli_u8(train, SPLIT_SEED + 1)
    if cfg.binarize != "none":
        # Dynamic binarization still evaluates on one fixed sample, so epochs and trials compare.
        val = _bernoulli_u8(val, EVAL_BINARIZE_SEED)
        test = _bernoulli_u8(test, EVAL_BINARIZE_SEED + 1)
    return Splits(
        train=train.contiguous(),
        train_labels=labels_all[train_idx],
        val=val.contiguous(),
        val_labels=labels_all[val_idx],
        test=test.contiguous(),
        test_labels=test_labels,
        dynamic_binarize=cfg.binarize == "dynamic",
        source=str(files["train_images"].parent),
    )


def shard_indices(n: int, rank: int, world: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's training indices for an epoch: a fresh seeded shuffle, split into equal,
    disjoint shards (the n % world left over rotate each epoch) so every rank takes equal steps."""
    g = torch.Generator().manual_seed(stream_seed(seed * 1_000_003 + epoch))
    per_rank = n // world
    return torch.randperm(n, generator=g)[rank * per_rank : (rank + 1) * per_rank]


def eval_indices(n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's evaluation indices: unshuffled, disjoint, together covering every image once."""
    return torch.arange(n)[rank::world]


def to_model_input(
    batch: torch.Tensor, dynamic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1], Bernoulli-sampled afresh when binarization is dynamic."""
    x = batch.float().div_(255)
    return torch.bernoulli(x, generator=generator) if dynamic else x
