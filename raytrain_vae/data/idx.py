"""MNIST-format sources (mnist, fashion_mnist): find or download the IDX files, read them."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import torch
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from raytrain_vae.config import DataSection
from raytrain_vae.data.source import DataError, DataSource, RawData
from raytrain_vae.outputs import OutputError, write_file_atomically

DATASETS: dict[str, type[MNIST]] = {"mnist": MNIST, "fashion_mnist": FashionMNIST}
IMAGE_SHAPE = (1, 28, 28)  # (C, H, W) of every dataset above
TRAIN_SPLIT_IMAGES = 60_000
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


def candidate_dirs(cfg: DataSection) -> list[Path]:
    """Folders searched, in order: torchvision's layout under root, root itself, system copies."""
    root = Path(cfg.root).expanduser()
    raw = root / DATASETS[cfg.source].__name__ / "raw"
    return [raw, root, *(Path(d) for d in SYSTEM_DIRS[cfg.source])]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def locate_files(cfg: DataSection) -> dict[str, Path] | None:
    """The first folder holding all four IDX files (plain or .gz), or None."""
    for folder in candidate_dirs(cfg):
        found = {key: _find(folder, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _download(cfg: DataSection) -> None:
    cls = DATASETS[cfg.source]
    root = Path(cfg.root).expanduser()
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as exc:  # offline, DNS, checksum, permissions: all mean "not available"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(_missing_message(cfg, f"download failed: {reason}")) from None


def _missing_message(cfg: DataSection, why: str) -> str:
    looked = ", ".join(str(d) for d in candidate_dirs(cfg))
    fix = (
        "set data.download=true with internet access, or put the four IDX files "
        f"({', '.join(FILES.values())}, optionally .gz) in {candidate_dirs(cfg)[0]}"
    )
    if cfg.source == "fashion_mnist":
        fix += ", or apt-get install dataset-fashion-mnist"
    return f"{cfg.source} not found ({why}); looked in {looked}; fix: {fix}"


def _read_idx(path: Path, reader, cache_dir: Path) -> torch.Tensor:
    """Read an IDX file with torchvision's reader, decompressing .gz into the cache once."""
    if path.suffix != ".gz":
        return reader(str(path))
    target = cache_dir / path.stem
    if target.is_file():
        return reader(str(target))
    plain = gzip.decompress(path.read_bytes())
    try:  # atomic: concurrent workers on one node never see half a file
        write_file_atomically(target, plain, "dataset cache")
    except OutputError:  # read-only root: read from a throwaway file instead
        with tempfile.NamedTemporaryFile(prefix=f".{path.stem}.") as tmp:
            tmp.write(plain)
            tmp.flush()
            return reader(tmp.name)
    return reader(str(target))


def ensure_files(cfg: DataSection) -> dict[str, Path]:
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


def read_idx_dataset(cfg: DataSection) -> RawData:
    """The dataset's training and test images (uint8, N x 1 x 28 x 28) and labels."""
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
            f"cannot read {cfg.source} from {files['train_images'].parent}: {exc}"
        ) from None
    raw = RawData(
        train=arrays["train_images"].unsqueeze(1),
        train_labels=arrays["train_labels"].long(),
        test=arrays["test_images"].unsqueeze(1),
        test_labels=arrays["test_labels"].long(),
        where=str(files["train_images"].parent),
    )
    if len(raw.train) != len(raw.train_labels) or len(raw.test) != len(raw.test_labels):
        raise DataError(f"{raw.where}: image and label counts differ")
    return raw


IDX_SOURCE = DataSource(
    image_shape=IMAGE_SHAPE,
    train_split_images=TRAIN_SPLIT_IMAGES,
    ensure=ensure_files,
    read=read_idx_dataset,
)
