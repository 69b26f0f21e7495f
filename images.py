"""Images from files, PIL or tensors as the encoders take them: RGB as a viewer shows the file, resized, one batch.
Every dataset layout and a trained model's `embed` read images through these."""
import os

import numpy as np
import torch
from PIL import Image


def open_image(path) -> Image.Image:
    """An image file as RGB, as an image viewer shows it (as_seen); a missing file raises FileNotFoundError, an
    undecodable one ValueError, naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist; fix the path in the CSV, or pass skip_missing=True "
                                "(config: skip_missing: true) to drop rows whose files are missing")
    try:
        with Image.open(path) as image:
            return as_seen(image)
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError and truncation are OSErrors
        raise ValueError(f"image {path} is corrupt, not a decodable image or too large to decode safely ({e}); "
                         "replace it, or pass skip_missing=True to drop rows whose files cannot be read") from e
    except ValueError as e:  # as_seen's: values it cannot show
        raise ValueError(f"image {path} is {e}") from e


def as_seen(image: Image.Image) -> Image.Image:
    """RGB as a viewer shows the file: turned by its EXIF orientation (phones store portraits sideways), 16-bit
    grey scaled to 8 bits (PIL's convert("RGB") clips it, and a 16-bit image comes out white), 32-bit float grey
    in [0, 1] or [0, 255] scaled alike (clipped, it comes out black), transparency (alpha, or a palette's
    transparent colour) laid over white."""
    from PIL import ImageOps
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(pixels).all() and 0 <= low and high <= 255):  # no scale a viewer would agree on
            raise ValueError(f"a float image with values in [{low:g}, {high:g}]; save it as 8- or 16-bit, or as floats "
                             "in [0, 1]")
        image = Image.fromarray(np.clip(pixels * (255 if high <= 1 else 1) + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        pixels = np.asarray(image, dtype=np.float32)
        peak = 65535 if image.mode != "I" or pixels.max() > 255 else 255
        image = Image.fromarray(np.clip(pixels * (255 / peak) + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def resized(image: Image.Image, image_size: int) -> torch.Tensor:
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return float_image(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255)


def load_image(path, image_size):
    """Image file -> 3xSxS float tensor in [0,1] (a plain resize)."""
    return resized(open_image(path), image_size)


def image_batch(images, image_size: int) -> torch.Tensor:
    """One image or a list of them (file paths, PIL images, 3xHxW tensors) or a Bx3xHxW tensor, as one batch: files
    and PIL images read and resized to image_size as a CSV dataset's are; tensors as given, so that an encoder's
    check names what is wrong with them (0-255 values, another size)."""
    if torch.is_tensor(images):
        return images
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if not images:
        raise ValueError("the image list is empty; pass at least one image (a file path, a PIL image or a 3xSxS "
                         "tensor)")
    images = [load_image(x, image_size) if isinstance(x, (str, os.PathLike)) else
              resized(as_seen(x), image_size) if isinstance(x, Image.Image) else x for x in images]
    if not all(torch.is_tensor(x) and x.dim() == 3 for x in images):
        raise ValueError(f"images must be file paths, PIL images or 3xSxS tensors in [0, 1]; got "
                         f"{[getattr(x, 'shape', type(x).__name__) for x in images][:4]}")
    if len({tuple(x.shape) for x in images}) > 1:
        raise ValueError(f"image tensors have different shapes {sorted({tuple(x.shape) for x in images})}; resize "
                         "them to one size, or pass file paths or PIL images (resized for you)")
    return torch.stack(images)


def float_image(chw) -> torch.Tensor:
    """A C×H×W array as a float32 tensor, clipped to [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.clip(chw, 0, 1), dtype=np.float32))
