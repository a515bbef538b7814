"""Tiny CIFAR-10 archives in the exact official layout, for tests that never touch the internet.

The official `cifar-10-python.tar.gz` holds `cifar-10-batches-py/` with data_batch_1..5,
test_batch, batches.meta and readme.html. Each batch is a protocol-2 pickle written by Python 2:
dict keys and strings are Python 2 `str` (BINSTRING opcodes, which Python 3 reads as bytes with
encoding="bytes"), `data` is a numpy uint8 array (n, 3072) of R, G, B planes, `labels` a list.
Python 3's own pickler would write bytes as `_codecs.encode(...)` calls instead, so this module
writes the Python 2 opcodes itself.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Py2Pickler(pickle._Pickler):
    def _py2str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else pickle.BINSTRING + struct.pack("<i", len(raw))
        self.write(head + raw)
        self.memoize(obj)

    def _ndarray(self, arr):
        # numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') then __setstate__(1, shape, dtype, False, bytes),
        # as Python 2's numpy wrote it.
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + pickle.GLOBAL + b"numpy\nndarray\n")
        self.save((0,))
        self._py2str(b"b")
        self.write(pickle.TUPLE3 + pickle.REDUCE + pickle.MARK)
        self.save(1)
        self.save(tuple(arr.shape))
        self.write(pickle.GLOBAL + b"numpy\ndtype\n")
        self._py2str(b"u1")
        self.save(0)
        self.save(1)
        self.write(pickle.TUPLE3 + pickle.REDUCE)
        self.save((3, "|", None, None, None, -1, -1, 0))
        self.write(pickle.BUILD)
        self.save(False)
        self._py2str(np.ascontiguousarray(arr, np.uint8).tobytes())
        self.write(pickle.TUPLE + pickle.BUILD)

    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[bytes] = _py2str
    dispatch[str] = _py2str
    dispatch[np.ndarray] = _ndarray


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def evil_pickle(marker: Path) -> bytes:
    """A 'batch' that would run `os.system("touch marker")` if an unpickler allowed the global."""
    cmd = f"touch {marker}".encode()
    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"os\nsystem\n" + pickle.SHORT_BINSTRING
            + bytes([len(cmd)]) + cmd + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


def make_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Learnable images: each class has its own mean colour, plus noise; every class present."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    palette = rng.integers(40, 216, size=(10, 3))
    hwc = palette[labels][:, None, None, :] + rng.normal(0, 30, size=(n, 32, 32, 3))
    hwc = np.clip(hwc, 0, 255).astype(np.uint8)
    rows = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
    return rows, labels.tolist()


def build_archive(path: Path, n_train: int = 500, n_test: int = 100, seed: int = 0,
                  replace: dict[str, bytes] | None = None, extra_members: list[tarfile.TarInfo] | None = None) -> str:
    """Write the archive; return its MD5. `replace` swaps a member's bytes (e.g. an evil pickle)."""
    assert n_train % 5 == 0
    rows, labels = make_images(n_train + n_test, seed)
    per = n_train // 5
    files: dict[str, bytes] = {}
    for b in range(5):
        sl = slice(b * per, (b + 1) * per)
        files[f"data_batch_{b + 1}"] = py2_pickle({"batch_label": f"training batch {b + 1} of 5", "labels": labels[sl],
                                                   "data": rows[sl], "filenames": [f"{i}.png" for i in range(per)]})
    files["test_batch"] = py2_pickle({"batch_label": "testing batch 1 of 1", "labels": labels[n_train:],
                                      "data": rows[n_train:], "filenames": [f"{i}.png" for i in range(n_test)]})
    files["batches.meta"] = py2_pickle({"num_cases_per_batch": per, "label_names": CLASSES, "num_vis": 3072})
    files["readme.html"] = b"<html>tiny test CIFAR-10</html>\n"
    files.update(replace or {})
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))
        for info in extra_members or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    path.write_bytes(raw.getvalue())
    return hashlib.md5(raw.getvalue()).hexdigest()


def expected_arrays(n_train: int = 500, n_test: int = 100, seed: int = 0):
    rows, labels = make_images(n_train + n_test, seed)
    hwc = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return hwc[:n_train], np.array(labels[:n_train]), hwc[n_train:], np.array(labels[n_train:])


def build_bomb(path: Path, member: str = "data_batch_1", claimed: int = 30 * 10**9, zeros: int = 0,
               extra_headers: int = 0, header_type: bytes = tarfile.REGTYPE) -> str:
    """A hostile archive: the tiny archive's members, then `member` again with a header claiming
    `claimed` bytes, followed by only `zeros` real bytes (gzip-compressed zeros: ~1 KB per MB).

    With zeros=0 the archive is a few KB and holds none of the claimed data: code that read the
    member before refusing it would hit the end of the file, not the size check. The header is
    written in the GNU format, whose base-256 size field holds sizes over 8 GiB.
    `extra_headers` empty-file headers go first (the "many headers" case); `header_type`
    tarfile.XHDTYPE makes the member a pax header instead of a file. Returns the MD5."""
    small = io.BytesIO()
    build_archive(path, n_train=50, n_test=10)
    with gzip.open(path, "rb") as gz:
        tar_bytes = gz.read()
    # Drop the end-of-archive marker (two zero blocks and padding) to append members after it.
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        end = tar.getmembers()[-1]
        end_offset = end.offset_data + tarfile.BLOCKSIZE * ((end.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE)
    with gzip.GzipFile(fileobj=small, mode="wb", mtime=0) as gz:
        for i in range(extra_headers):
            info = tarfile.TarInfo(f"cifar-10-batches-py/empty_{i}")
            gz.write(info.tobuf(tarfile.GNU_FORMAT))
        gz.write(tar_bytes[:end_offset])
        info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
        info.size, info.mode, info.type = claimed, 0o644, header_type
        gz.write(info.tobuf(tarfile.GNU_FORMAT))
        chunk = bytes(1 << 20)
        for start in range(0, zeros, len(chunk)):  # streamed: building a 3 GB bomb needs 1 MB of memory
            gz.write(chunk[: min(len(chunk), zeros - start)])
        # Padding to a whole block, then the end-of-archive marker: a complete tar when zeros == claimed.
        gz.write(bytes(-zeros % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE))
    path.write_bytes(small.getvalue())
    return hashlib.md5(small.getvalue()).hexdigest()
