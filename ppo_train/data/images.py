"""Images of vision-language rows, read by the data layer: open and check an image (the pixel
limit, a missing or undecodable file), normalize a row's image entry to a reference, and
identify a prompt's images for caches and resumes. Opening images is all the data layer does
with them; the model's processor turns them into tensors (ppo_train.vision)."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

from ppo_train.errors import DataError


def set_pixel_limit(limit: int | None) -> None:
    """`dataset.max_image_pixels`: PIL's own decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
    the documented setting), for every image this process opens: an image with more pixels is an
    invalid row (open_image) instead of PIL's warning, or its error at twice the limit. None: no
    limit."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = limit


def open_image(ref, where: str = "image"):
    """A decoded PIL image from a reference (path, bytes or PIL image); DataError naming
    `where` when the file is missing, cannot be decoded, has no pixels or more than
    dataset.max_image_pixels (set_pixel_limit)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        image = ref
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)  # reads the header only
            image.load()
        except FileNotFoundError:
            raise DataError(f"{where}: image file {ref!r} not found") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise DataError(f"{where}: the image has more pixels than dataset.max_image_pixels="
                            f"{Image.MAX_IMAGE_PIXELS} ({err}); raise the limit if the file is trusted") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            name = f"{len(ref)} bytes" if isinstance(ref, bytes) else repr(ref)
            raise DataError(f"{where}: cannot decode the image ({name}): {err}") from None
    if image.width == 0 or image.height == 0:
        raise DataError(f"{where}: the image has no pixels ({image.width} x {image.height})")
    return image


def image_ref(value: Any, where: str, base_dir: Path | None):
    """Normalize one entry of a row's `images` to a reference open_image accepts (and check
    that it opens): a relative path is taken from `base_dir` (the data file's folder). URLs are
    not fetched (a training job should not depend on a web server): download the images and
    give their paths, or load the data through a hub dataset whose image column holds them."""
    from PIL import Image

    if isinstance(value, dict):  # a datasets Image column read without decoding
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        if "://" in value:
            raise DataError(f"{where}: {value!r} is a URL; images are not downloaded: give a local path (relative "
                            "to the data file's folder), bytes, or a hub dataset whose image column holds them")
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        value = str(path)
    elif not isinstance(value, (bytes, Image.Image)):
        raise DataError(f"{where}: expected an image path, bytes or a PIL image, got {type(value).__name__}")
    open_image(value, where)
    return value


def image_digest(refs) -> bytes:
    """What identifies the images of a prompt for caches and resumes: the bytes of bytes, the
    path with size and modification time of files, the pixels of PIL images."""
    h = hashlib.sha256()
    for ref in refs:
        if isinstance(ref, bytes):
            h.update(ref)
        elif isinstance(ref, str):
            stat = Path(ref).stat()
            h.update(f"{ref}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            h.update(ref.tobytes())
    return h.digest()
