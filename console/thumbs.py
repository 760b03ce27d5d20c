"""Frame thumbnails: the cached frame's bytes, downscaled once on the server and kept in memory.

A frame id names immutable bytes, so a thumbnail never goes stale; the cache is a bounded LRU. Frames are
checked against [limits] (bytes, pixels, formats) before decoding, as the worker checks them.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import redis
from PIL import Image, UnidentifiedImageError

from daemon.config import LimitsSection
from daemon.store import Keys

JPEG_QUALITY = 80


class ThumbnailError(ValueError):
    """The frame is cached but cannot be shown (too large, not an accepted image)."""


class Thumbnails:
    def __init__(self, client: redis.Redis, keys: Keys, limits: LimitsSection, px: int, max_items: int) -> None:
        self.client = client
        self.keys = keys
        self.limits = limits
        self.px = px
        self.max_items = max_items
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, frame_id: str) -> bytes | None:
        """JPEG bytes of the frame's thumbnail; None when the frame is not (or no longer) cached."""
        with self._lock:
            if frame_id in self._cache:
                self._cache.move_to_end(frame_id)
                return self._cache[frame_id]
        key = self.keys.frame(frame_id)
        size = self.client.strlen(key)
        if size > self.limits.max_image_bytes:
            raise ThumbnailError(f"frame is {size} bytes, more than [limits] max_image_bytes")
        data = self.client.get(key)
        if data is None:
            return None
        thumb = self.render(data)
        with self._lock:
            self._cache[frame_id] = thumb
            while len(self._cache) > self.max_items:
                self._cache.popitem(last=False)
        return thumb

    def render(self, data: bytes) -> bytes:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in self.limits.image_formats:
                    raise ThumbnailError(f"{img.format} is not an accepted image format")
                if img.width * img.height > self.limits.max_image_pixels:
                    raise ThumbnailError(f"{img.width}x{img.height} is more than [limits] max_image_pixels")
                img.draft("RGB", (self.px, self.px))  # JPEG: decode at a reduced scale, much faster
                img.thumbnail((self.px, self.px))
                out = io.BytesIO()
                img.convert("L" if img.mode in ("L", "I;16", "I", "1") else "RGB").save(
                    out, "JPEG", quality=JPEG_QUALITY
                )
                return out.getvalue()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ThumbnailError(f"not a readable image ({exc})") from exc
