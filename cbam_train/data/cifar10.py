"""CIFAR-10's python pickle batches: read them safely (no code runs while unpickling), download them when
asked, or fail with one line that names the file and what to do."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from cbam_train.config.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles of dicts of numpy arrays: allow exactly that, nothing that runs code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
               ("__builtin__", "bytes"), ("builtins", "bytes")}  # protocol-2 bytes, as Python 3 writes them

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple:
    if not path.is_file():
        raise DataError(f"data=cifar10: batch file missing: {path}; re-download (delete the folder) "
                        "or point data.root at a complete copy")
    try:
        d = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        data = np.asarray(d.get("data", d.get(b"data")), dtype=np.uint8)
        labels = np.asarray(d.get("labels", d.get(b"labels")), dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except Exception as e:  # any failure here means the file is not a CIFAR-10 batch
        raise DataError(f"data=cifar10: {path} is not a valid CIFAR-10 batch ({type(e).__name__}: {e})"[:300]) \
            from None
    if len(images) != len(labels):
        raise DataError(f"data=cifar10: {path} has {len(images)} images but {len(labels)} labels")
    return images, labels


def load_cifar10(root: str, download: bool) -> tuple:
    """(train_x, train_y, test_x, test_y, classes) from root/cifar-10-batches-py; downloads if asked."""
    base = Path(root) / CIFAR10_DIR
    if not base.is_dir():
        hint = ("point data.root at a folder holding cifar-10-batches-py/, use data=imagefolder data.root=PATH "
                "for a local image folder, or experiment=smoke for generated data")
        if not download:
            raise DataError(f"data=cifar10: {base} not found and data.download=false; {hint}")
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(CIFAR10_URL, str(root), filename="cifar-10-python.tar.gz", md5=CIFAR10_MD5)
        except Exception as e:  # URLError, OSError, md5 mismatch, truncated tar: all mean "not available"
            reason = getattr(e, "reason", None) or e
            raise DataError(f"data=cifar10: could not download CIFAR-10 to {root} ({reason}); {hint}") from None
    parts = [_read_cifar_batch(base / f) for f in CIFAR10_TRAIN]
    tx, ty = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    sx, sy = _read_cifar_batch(base / CIFAR10_TEST[0])
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = base / "batches.meta"
    if meta.is_file():
        try:
            d = _ArrayUnpickler(io.BytesIO(meta.read_bytes()), encoding="latin1").load()
            names = d.get("label_names", d.get(b"label_names"))
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except Exception:  # the metadata only names classes; the defaults are CIFAR-10's own
            pass
    return tx, ty, sx, sy, classes
