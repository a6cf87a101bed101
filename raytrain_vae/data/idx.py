"""MNIST-format sources (mnist, fashion_mnist): find or download the IDX files, read them."""

from __future__ import annotations

import contextlib
import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from raytrain_vae.config import DataSection
from raytrain_vae.data.source import DataError, DataSource, RawData
from raytrain_vae.outputs import OutputError, write_file_atomically

# torchvision's dataset class for each source: it downloads, and names the folder it uses.
DATASETS: dict[str, str] = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
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
    raw = root / DATASETS[cfg.source] / "raw"
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
    # Imported only to download: torchvision slows every importing process's start-up, and
    # each Ray worker reads the IDX files (docs/performance.md).
    import torchvision.datasets

    cls = getattr(torchvision.datasets, DATASETS[cfg.source])
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


def parse_idx(data: bytes, ndim: int) -> torch.Tensor:
    """The uint8 array of an IDX file's bytes (big-endian header: two zero bytes, type 0x08,
    the number of dimensions, then each dimension as a uint32), checked to have ndim of them."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise ValueError(f"not an IDX file of {ndim}-dimensional uint8 data (header {data[:4]!r})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"cut short in its header ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"holds {len(data) - header} bytes of data, its header says {shape}")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy())


def _idx_bytes(path: Path, cache_dir: Path) -> bytes:
    """An IDX file's bytes, decompressing .gz into the cache once."""
    if path.suffix != ".gz":
        return path.read_bytes()
    target = cache_dir / path.stem
    if target.is_file():
        return target.read_bytes()
    plain = gzip.decompress(path.read_bytes())
    # Atomic: concurrent workers on one node never see half a file. A read-only root: the
    # next run decompresses again.
    with contextlib.suppress(OutputError):
        write_file_atomically(target, plain, "dataset cache")
    return plain


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


def read_idx_file(path: Path, ndim: int, cache_dir: Path, source: str) -> torch.Tensor:
    """One IDX file's uint8 array; a file that is no IDX file of ndim dimensions (an HTML error
    page saved under its name, a cut-short download) is a DataError naming it."""
    try:
        return parse_idx(_idx_bytes(path, cache_dir), ndim)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"cannot read {source} from {path}: {exc}") from None


def read_idx_dataset(cfg: DataSection) -> RawData:
    """The dataset's training and test images (uint8, N x 1 x 28 x 28) and labels."""
    files = ensure_files(cfg)
    cache = candidate_dirs(cfg)[0]
    arrays = {
        key: read_idx_file(path, 1 if "labels" in key else 3, cache, cfg.source)
        for key, path in files.items()
    }
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
