"""Image folders: root/<split>/<class>/<image>, decoded to uint8 (3, S, S), with an on-disk cache of
the decoded split for the in-memory loader."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from cbam_train.config.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def scan_image_folder(split_dir: Path) -> tuple:
    """(paths, labels, classes, n_ignored) for split_dir/<class>/<image>; classes sorted by name."""
    if not split_dir.is_dir():
        raise DataError(f"data=imagefolder: {split_dir} not found; expected {split_dir}/<class>/<images>")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"data=imagefolder: {split_dir} has no class folders; expected {split_dir}/<class>/<images>")
    paths, labels, ignored = [], [], 0
    for label, c in enumerate(classes):
        files = sorted(p for p in (split_dir / c).rglob("*")  # hidden files and folders (.ipynb_checkpoints) skipped
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(split_dir).parts))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        ignored += len(files) - len(images)
        if not images:
            raise DataError(f"data=imagefolder: class folder {split_dir / c} has no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        paths += images
        labels += [label] * len(images)
    return paths, np.asarray(labels, dtype=np.int64), classes, ignored


def decode_image(path: Path, image_size: int) -> tuple:
    """(uint8 (3, S, S) RGB, None) or (None, why it cannot be read): the shorter side resized to S (antialiased
    bilinear) and centre-cropped, unless already S x S. How training, eval and task=predict read an image file."""
    try:
        with Image.open(path) as im:
            img = F.pil_to_tensor(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    s = image_size
    if img.shape[1:] != (s, s):
        img = F.center_crop(F.resize(img, s, antialias=True), [s, s])
    return img, None


class ImageFiles:
    """Images stored as files: `self(i)` decodes one to uint8 (3, S, S) (RGB; shorter side resized to S and
    centre-cropped if needed); `take(idx)` decodes many. Picklable, for DataLoader workers.

    `take` decodes the whole split once and caches it as one uint8 tensor in <root>/.cbam-cache/ (keyed by
    file names, sizes, mtimes and S), so the next run loads it in a second. A small subset (a `data.limit`
    run) is decoded directly and not cached. An unreadable image raises DataError naming it
    (bad_images="error") or is recorded in `bad` (index -> reason) and given as None / a zero image ("skip").
    """

    def __init__(self, paths: Sequence[Path], image_size: int, bad_images: str = "error") -> None:
        self.paths, self.image_size, self.bad_images = list(paths), image_size, bad_images
        self.bad: dict = {}
        self._all: Optional[torch.Tensor] = None

    def __getstate__(self) -> dict:  # workers decode single files; never ship the decoded split to them
        return {**self.__dict__, "_all": None}

    def _decode(self, i: int) -> tuple:
        return decode_image(self.paths[i], self.image_size)

    def _unreadable(self, found: dict) -> DataError:
        i, reason = next(iter(found.items()))
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        return DataError(f"data=imagefolder: cannot read image {self.paths[i]} ({reason}){more}; fix or remove it, "
                         "or set data.bad_images=skip to leave unreadable images out")

    def __call__(self, i: int) -> Optional[torch.Tensor]:
        img, reason = self._decode(i)
        if img is None:
            if self.bad_images == "error":
                raise self._unreadable({i: reason})
            self.bad[i] = reason
        return img

    def _decode_many(self, idx) -> torch.Tensor:
        blank = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        out, found = [], {}
        for i in idx:
            img, reason = self._decode(int(i))
            if img is None:
                found[int(i)] = reason
            out.append(blank if img is None else img)
        if found and self.bad_images == "error":
            raise self._unreadable(found)
        self.bad.update(found)
        return torch.stack(out) if out else blank.new_zeros(0, *blank.shape)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        """The images at idx as one uint8 (N, 3, S, S) tensor; unreadable ones (skip policy) are zeros, see `bad`."""
        if self._all is None:
            cached = _read_decode_cache(self.paths, self.image_size)
            if cached is not None:
                self._all, bad = cached
                if bad and self.bad_images == "error":
                    raise self._unreadable(bad)
                self.bad.update(bad)
        if self._all is None and len(idx) * 4 < len(self.paths):
            return self._decode_many(idx)
        if self._all is None:
            self._all = self._decode_many(range(len(self.paths)))
            _write_decode_cache(self.paths, self.image_size, self._all, self.bad)
        return self._all[torch.as_tensor(idx, dtype=torch.long)]


def _decode_cache_path(paths: Sequence[Path], image_size: int) -> Optional[Path]:
    if not paths:
        return None
    h = hashlib.sha1(str(image_size).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    split_dir = Path(paths[0]).parent.parent
    return split_dir.parent / ".cbam-cache" / f"{split_dir.name}-{image_size}px-{h.hexdigest()[:16]}.pt"


def _read_decode_cache(paths: Sequence[Path], image_size: int) -> Optional[tuple]:
    """(images, {index: reason} of unreadable files) from the cache, or None."""
    path = _decode_cache_path(paths, image_size)
    if path is None or not path.is_file():
        return None
    try:
        obj = torch.load(path, weights_only=True)
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    x, bad = (obj.get("images"), obj.get("bad")) if isinstance(obj, dict) else (None, None)
    if not isinstance(x, torch.Tensor) or x.shape != (len(paths), 3, image_size, image_size) or \
            not isinstance(bad, dict):
        return None
    return x, {int(k): str(v) for k, v in bad.items()}


def _write_decode_cache(paths: Sequence[Path], image_size: int, images: torch.Tensor, bad: dict) -> None:
    path = _decode_cache_path(paths, image_size)
    if path is None:
        return
    from cbam_train.state.weights import atomic_save

    try:
        atomic_save({"images": images, "bad": dict(bad)}, path)
    except (OSError, RuntimeError):  # a read-only or full data folder only costs the next run a decode
        pass
