"""User images for reconstruct and encode: a dataset split, Parquet or an image folder, listed
from metadata into units that read independently (in-process, or as Ray Data tasks), each
checked row by row into id, label and uint8 pixel columns, shaped as in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrain_vae.config import UserError, is_uri
from raytrain_vae.data import split_images
from raytrain_vae.data.preprocess import ImageSpec, spec_of
from raytrain_vae.input_rows import (
    InputPlan,
    InputUnit,
    fixed_size_list,
    read_input_unit,
    short_reason,
    shown_text,
)
from raytrain_vae.model_io import load_model_dir
from raytrain_vae.storage import NoFilesError, filesystem_for, list_files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # an image folder's files, in any letter case
FILES_PER_UNIT = 256


def read_inputs(model_dir: str, split: str, input_path: str | None) -> pa.Table:
    """Rows id, label (when known), pixels (fixed_size_list<uint8>) from the model's dataset
    split, or from Parquet (an `image` column of PNG/JPEG bytes, or a `pixels` column of C*H*W
    integers 0..255; optional integer `id` and `label`) or a folder of PNG/JPEG files, read
    here unit by unit (the batch jobs read the same units in Ray Data tasks).

    Input that cannot be read raises a one-line UserError naming the file (and the row,
    counted from 0, or the column); nothing is written."""
    if input_path is None:
        _, cfg = load_model_dir(model_dir)
        return _split_rows(cfg, split)
    units, plan = input_units(model_dir, input_path)
    return pa.concat_tables([read_input_unit(u, plan) for u in units])


def input_units(model_dir: str, input_path: str) -> tuple[list[InputUnit], InputPlan]:
    """--input listed into units from file names and Parquet footers only (no image is read):
    the driver's whole share of a batch job."""
    model, cfg = load_model_dir(model_dir)
    spec = spec_of(cfg.data, model.image_shape[0])
    if spec.size is None:  # trained at the images' own size: inputs must have it too
        spec = ImageSpec(spec.channels, None, spec.crop)
    plan = InputPlan(tuple(model.image_shape), spec, input_path)
    path = _input_path(input_path)
    if _is_image_folder(path):
        files = _image_files(path)
        units = [
            InputUnit(files=tuple(files[i : i + FILES_PER_UNIT]), first_id=i)
            for i in range(0, len(files), FILES_PER_UNIT)
        ]
        return units, plan
    return _parquet_units(path), plan


def _split_rows(cfg, split: str) -> pa.Table:
    """The rows of one split (test, val or train) of the model's own dataset."""
    if split not in ("test", "val", "train"):
        raise UserError(f"split must be test, val or train (got '{shown_text(split, 20)}')")
    images, labels = split_images(cfg.data, split)
    if len(images) == 0:
        raise UserError(f"the {split} split of {cfg.data.source} has no images")
    return pa.table(
        {
            "id": pa.array(np.arange(len(images)), pa.int64()),
            "label": pa.array(labels.numpy(), pa.int64()),
            "pixels": fixed_size_list(images.reshape(len(images), -1).numpy()),
        }
    )


def _input_path(input_path: str) -> str:
    """--input as an existing, non-empty file or a folder (local), or a URI; anything else is
    a UserError."""
    shown = shown_text(input_path)
    if not input_path:
        raise UserError("--input is empty: give a Parquet file or a folder of images")
    if "\0" in input_path:
        raise UserError(f"{shown}: --input holds a NUL byte")
    if is_uri(input_path):
        return input_path
    try:
        path = Path(input_path).expanduser()
        if path.is_dir():
            return str(path)
        if not path.exists():
            raise UserError(f"{shown}: no such file or folder")
        if not path.is_file():
            raise UserError(f"{shown}: not a regular file or folder")
        if path.stat().st_size == 0:
            raise UserError(f"{shown}: empty file (Parquet expected)")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise UserError(f"{shown}: --input takes Parquet or a folder of images, not one image")
    except (OSError, RuntimeError) as exc:  # RuntimeError: ~user whose home is unknown
        raise UserError(f"{shown}: cannot read ({short_reason(exc)})") from None
    return str(path)


def _is_image_folder(path: str) -> bool:
    """A folder without Parquet files (at any depth) is read as a folder of images."""
    fs, inner = filesystem_for(path)
    if fs.get_file_info(inner).type != pa.fs.FileType.Directory:
        return False
    try:
        list_files(path, (".parquet",))
    except NoFilesError:
        return True
    return False


def _image_files(path: str) -> list[str]:
    """The folder's .png/.jpg/.jpeg files (subfolders too), in sorted path order."""
    try:
        return list_files(path, IMAGE_SUFFIXES)
    except NoFilesError:
        raise UserError(
            f"{shown_text(path)}: no .png, .jpg, .jpeg or .parquet files to read"
        ) from None


def _parquet_units(path: str) -> list[InputUnit]:
    """A Parquet file's (or a folder of them) row groups, from the footers; ids count on
    across files."""
    files = list_files(path, (".parquet",))
    units, first_id = [], 0
    for file in files:
        meta = _footer(file)
        first_row = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append(InputUnit(parquet=file, row_group=group, first_row=first_row,
                                   first_id=first_id))  # fmt: skip
            first_row += rows
            first_id += rows
    if first_id == 0:
        raise UserError(f"{shown_text(path)}: no rows to read")
    return [u for u in units if u.parquet]


def _footer(file: str) -> pq.FileMetaData:
    fs, inner = filesystem_for(file)
    try:
        with fs.open_input_file(inner) as f:
            return pq.ParquetFile(f).metadata
    except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
        reason = short_reason(exc, 120, Path(inner))
        raise UserError(f"{shown_text(file)}: not readable as Parquet ({reason})") from None
