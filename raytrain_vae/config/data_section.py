"""The data section of the config: which images, how they are split, shaped and ingested."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raytrain_vae.config.base import Section, local_or_uri_path, short

# Sources that read the user's own files (data.path) rather than a named public dataset.
FILE_SOURCES = ("image_folder", "parquet")


def _pair(value: Any) -> Any:
    """An int N means N x N; a list is [height, width]."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    return value


class DataSection(Section):
    source: Literal["mnist", "fashion_mnist", "cifar10", "image_folder", "parquet"] = Field(
        "fashion_mnist",
        description="Where images come from: mnist, fashion_mnist, cifar10 (torchvision "
        "datasets), image_folder (PNG/JPEG files under data.path; subfolders become labels) or "
        "parquet (a column of PNG/JPEG bytes or of pixels, under data.path).",
    )
    path: str | None = Field(
        None,
        description="image_folder and parquet: a local folder or file, or a URI (s3://, gs://, "
        "anything pyarrow reaches; the endpoint comes from AWS_ENDPOINT_URL).",
    )
    test_path: str | None = Field(
        None,
        description="image_folder and parquet: a separate folder or file of test images; null = "
        "the test split is data.test_fraction of data.path.",
    )
    image_column: str = Field(
        "image",
        min_length=1,
        description="parquet: the column of image file bytes (PNG/JPEG), or of uint8 pixels "
        "(a list of C*H*W values; give their shape in data.pixels_shape).",
    )
    pixels_shape: list[int] | None = Field(
        None,
        description="parquet: [C, H, W] of a pixels column (row-major, channel first); null = "
        "the column holds image file bytes.",
    )
    label_column: str | None = Field(
        None, description="parquet: an integer label column (optional; labels are kept, unused)."
    )
    id_column: str | None = Field(
        None,
        description="parquet: a column that identifies each image, hashed to assign its split; "
        "null = the file's path and the row's position in it.",
    )
    root: str = Field(
        "~/.cache/raytrain_vae/data",
        description="Where mnist, fashion_mnist and cifar10 are looked for and downloaded to "
        "(torchvision layout).",
    )
    _root = field_validator("root")(local_or_uri_path)
    download: bool = Field(
        True, description="mnist, fashion_mnist, cifar10: download if no local copy is found."
    )
    channels: Literal[1, 3] | None = Field(
        None,
        description="1 (grey) or 3 (RGB): every image is converted to it; null = the source's "
        "own (1 for mnist and fashion_mnist, 3 for the others).",
    )
    image_size: list[int] | None = Field(
        None,
        description="Resize every image (after data.crop) to this size: N or [height, width]; "
        "null = keep the size, which must then be the same for every image.",
    )
    crop: list[int] | None = Field(
        None,
        description="Centre-crop every image to this size before resizing: N or [height, "
        "width]; null = no crop. CelebA: crop 140, image_size 64.",
    )
    hflip: bool = Field(
        False,
        description="Augment: mirror each training image left-right with probability 1/2, "
        "afresh every epoch (in the Ray Data tasks when streamed); validation and test never.",
    )
    binarize: Literal["none", "static", "dynamic"] = Field(
        "dynamic",
        description="none: grey levels in [0, 1]; static: one fixed Bernoulli sample per image; "
        "dynamic: a fresh Bernoulli sample every time an image is drawn for training.",
    )
    limit: int | None = Field(
        None,
        gt=0,
        le=2**40,
        description="Use only this many training-split images (quick runs); null = all.",
    )
    val_fraction: float = Field(
        1 / 12,
        gt=0,
        lt=1,
        description="Fraction of the training split held out for validation (model selection); "
        "the test split is never used during training.",
    )
    test_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="image_folder and parquet without data.test_path: the fraction of images "
        "held out as the test split. Splits go by a stable hash of each image's path or id, "
        "so they never move when files are added or listed in another order.",
    )
    ingest: Literal["memory", "stream", "auto"] = Field(
        "auto",
        description="memory: decode every image once into each worker's memory; stream: read, "
        "decode and shuffle from storage every epoch in Ray Data tasks, sharded over the "
        "workers (image_folder and parquet); auto: stream when the decoded training set "
        "exceeds data.stream_above_mb.",
    )
    stream_above_mb: float = Field(
        2048,
        gt=0,
        description="ingest auto: stream when the decoded images (C*H*W bytes each) exceed this.",
    )
    shuffle_buffer: int = Field(
        4096,
        ge=0,
        le=2**24,
        description="ingest stream: images in each worker's local shuffle buffer, on top of a "
        "fresh random order of files (or row groups) every epoch; 0 = file order only.",
    )

    @model_validator(mode="before")
    @classmethod
    def _dataset_is_source(cls, data: Any) -> Any:
        """`data.dataset`, the key's name before data.source, still loads older config files."""
        if isinstance(data, dict) and "dataset" in data:
            data = dict(data)
            if "source" in data:
                raise ValueError("give data.source only (data.dataset is its old name)")
            data["source"] = data.pop("dataset")
        return data

    @field_validator("image_size", "crop", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return _pair(v)

    @field_validator("image_size", "crop")
    @classmethod
    def _size_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or any(not 1 <= side <= 2**15 for side in v)):
            raise ValueError(f"must be N or [height, width], each 1..32768 (got {short(v)})")
        return v

    @field_validator("pixels_shape")
    @classmethod
    def _pixels_shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (
            len(v) != 3 or v[0] not in (1, 3) or any(not 1 <= s <= 2**15 for s in v[1:])
        ):
            raise ValueError(f"must be [C, H, W] with C 1 or 3 (got {short(v)})")
        return v

    @field_validator("path", "test_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else local_or_uri_path(v)

    @model_validator(mode="after")
    def _path_for_files(self) -> DataSection:
        if self.source in FILE_SOURCES and self.path is None:
            raise ValueError(f"data.source={self.source} reads data.path: set it")
        if self.source not in FILE_SOURCES and (self.path or self.test_path):
            raise ValueError(
                f"data.path and data.test_path are read by image_folder and parquet, not "
                f"data.source={self.source}"
            )
        return self

    @property
    def reads_files(self) -> bool:
        """Whether images come from the user's files (data.path), which can be streamed."""
        return self.source in FILE_SOURCES

    def split_sizes(self, available: int) -> tuple[int, int]:
        """(training, validation) image counts taken from `available` training-split images."""
        n = min(available, self.limit) if self.limit is not None else available
        n_val = max(1, round(n * self.val_fraction))
        return n - n_val, n_val
