"""Decoded training images kept in memory, up to a size bound: a small data set (the synthetic
world's 64-pixel scenes) is decoded once, not once per step.

Exact: the training transform reads the cached RGB image and writes a new one (crop, resize), so a
sample's crop is the same whether its image came from the cache or from the file.
"""
from __future__ import annotations

from .sources import Record, image_name, open_rgb_image, read_image_bytes

#: PIL keeps an RGB image's pixels in 4 bytes (RGBX): what one cached pixel costs.
BYTES_PER_PIXEL = 4


def open_image(record: Record):
    """The record's image as an RGB PIL image; raises :class:`DataError` naming the file."""
    return open_rgb_image(lambda: read_image_bytes(record), image_name(record))


class ImageCache:
    """Record index -> its decoded RGB image, filled as images are first read, until the pixels held
    reach ``max_bytes``; later images are decoded on each read. A file changed on disk during the
    run is not read again once cached. Unreadable images are never cached (they raise each time)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = int(max_bytes), 0
        self._images: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._images)

    def get(self, index: int, record: Record):
        """The image of record ``index`` (``record``), from memory when cached."""
        image = self._images.get(index)
        if image is None:
            image = open_image(record)
            size = image.width * image.height * BYTES_PER_PIXEL
            if self.used + size <= self.max_bytes:
                self._images[index] = image
                self.used += size
        return image
