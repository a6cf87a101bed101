"""One image pipeline for training and batch jobs: decode, convert channels, centre-crop, resize."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from raytrain_vae.config import DataSection
from raytrain_vae.data.source import DataError


@dataclass(frozen=True)
class ImageSpec:
    """What every image becomes: `channels` (1 or 3), centre-cropped to `crop` (H, W), then
    resized to `size` (H, W); None leaves that step out."""

    channels: int
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None

    def output_shape(self, native_hw: tuple[int, int]) -> tuple[int, int, int]:
        """(C, H, W) of an image whose own size is native_hw, once through this spec."""
        h, w = self.size or self.crop or native_hw
        return self.channels, h, w


def spec_of(cfg: DataSection, native_channels: int) -> ImageSpec:
    """The spec data.channels, data.crop and data.image_size describe (channels default to the
    source's own)."""
    return ImageSpec(
        channels=cfg.channels or native_channels,
        size=tuple(cfg.image_size) if cfg.image_size else None,
        crop=tuple(cfg.crop) if cfg.crop else None,
    )


def transforms():  # noqa: ANN201 (a module)
    """torchvision's v2 functional transforms, imported when an image first needs one: importing
    torchvision slows every process's start-up (each Ray worker too), and images already at their
    size and channels need none of it."""
    from torchvision.transforms.v2 import functional

    return functional


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, channels, H, W): grey repeated into RGB, or RGB to grey with
    the ITU-R 601-2 weights PIL's convert('L') uses, so tensors and files agree."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    return transforms().rgb_to_grayscale(images)


def crop_and_resize(images: torch.Tensor, spec: ImageSpec, where: str = "images") -> torch.Tensor:
    """uint8 (..., H, W) centre-cropped to spec.crop, then resized (bilinear, antialiased) to
    spec.size; an image smaller than the crop is refused rather than padded."""
    if spec.crop is not None:
        h, w = images.shape[-2:]
        if h < spec.crop[0] or w < spec.crop[1]:
            raise DataError(
                f"{where}: image is {w}x{h}, smaller than data.crop {spec.crop[1]}x{spec.crop[0]}"
            )
        images = transforms().center_crop(images, list(spec.crop))
    if spec.size is not None and tuple(images.shape[-2:]) != spec.size:
        images = transforms().resize(images, list(spec.size), antialias=True)
    return images


def preprocess(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """A source's uint8 (N, C, H, W) images through the spec (channels, crop, resize)."""
    return crop_and_resize(convert_channels(images, spec.channels), spec).contiguous()


def decode_image(data: bytes, spec: ImageSpec, where: str) -> torch.Tensor:
    """Image file bytes (PNG, JPEG or anything PIL reads) -> uint8 (C, H, W) through the spec.

    Colour modes (palette, alpha, 16-bit, CMYK) go through PIL's own conversion to L or RGB;
    a file that is not an image, or is truncated, raises a DataError naming `where`."""
    try:
        image = Image.open(io.BytesIO(data))
        image = image.convert("L" if spec.channels == 1 else "RGB")
    except Image.DecompressionBombError:
        raise DataError(f"{where}: image is too large to decode") from None
    except UnidentifiedImageError:  # its message is the repr of our in-memory buffer
        raise DataError(f"{where}: not a readable PNG/JPEG image (no known format)") from None
    except Exception as exc:  # PIL raises many types for bytes that are not a whole image
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:80]
        raise DataError(f"{where}: not a readable PNG/JPEG image ({reason})") from None
    array = np.array(image)  # writable: torch refuses to share a read-only buffer
    tensor = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
    return crop_and_resize(tensor, spec, where).contiguous()
