"""Fetch the CIFAR-10 archive, verify it, and turn it into compact uint8 arrays.

Order of trust, for an archive that may come from an untrusted mirror:
1. stream it to a temporary file, hashing as it arrives; nothing is renamed into place
   unless the MD5 matches the expected one;
2. refuse the whole archive if any member could land outside the target folder
   (absolute path, `..`, links, devices), or is larger than any CIFAR-10 file could be
   (from its tar header, before a byte of it is decompressed): a hostile mirror can't make
   us inflate a decompression bomb into memory or stream an endless file onto the disk;
3. unpickle the batches with an unpickler that only knows the numpy globals an array needs,
   so a batch naming any other global fails before anything runs.
The result is one `.npz` of uint8 arrays that training loads in well under a second.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlparse

import numpy as np

from cifarpipe import atomic
from cifarpipe.config import UserError

BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
NUM_CLASSES = 10
CHUNK = 1 << 20  # 1 MiB per read: ~170 reads for the 163 MiB official archive
MIB = 1 << 20

# Limits for an archive from an untrusted mirror; the real one is far inside every one of them.
# The official cifar-10-python.tar.gz is 170,498,071 bytes (163 MiB; the rebuild from
# ../shared/datasets is 173,588,625 bytes): the download is cut off above 256 MiB (+50 %).
MAX_DOWNLOAD_BYTES = 256 * MIB
# A data or test batch is a pickle of a 10000x3072 uint8 array (30,720,000 bytes) plus 10000
# labels and file names: 31,035,704 bytes in the official archive (30,939,539 in the rebuild).
# 40 MiB (41,943,040 bytes) leaves a 35 % margin. batches.meta (158 bytes) and readme.html
# (88 bytes) are tiny: anything else may have 1 MiB.
MAX_BATCH_BYTES = 40 * MIB
MAX_OTHER_BYTES = 1 * MIB
# The official archive has 8 entries (7 files, maybe their folder) and about 186 MB (177 MiB) of
# files in all. The reader walks at most 64 entries and 256 MiB of tar stream (headers included):
# it decompresses no more than that, whatever the gzip stream holds, and holds no more than the
# members it needs (at most 6 x 40 MiB) in memory.
MAX_MEMBERS = 64
MAX_TAR_BYTES = 256 * MIB


class ChecksumError(UserError):
    pass


class UnsafeArchiveError(UserError):
    pass


# ---------------------------------------------------------------- download
def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _open_source(url: str, timeout_s: float) -> tuple[io.BufferedIOBase, int | None]:
    """Open an http(s)/file URL or a local path; return the stream and its size if known."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        resp = urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 (scheme checked above)
        size = resp.headers.get("Content-Length")
        return resp, int(size) if size else None
    path = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(url)
    try:
        return open(path, "rb"), path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read the archive at {url}: {e.strerror}") from None


def _is_retryable(err: Exception) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code == 429  # server trouble: worth another try; 404 is not
    return isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError, OSError))


def download(url: str, dest: Path, md5: str, *, retries: int = 2, timeout_s: float = 60.0,
             progress: Callable[[int, int | None], None] | None = None, backoff_s: float = 1.0) -> bool:
    """Make `dest` a verified copy of the archive at `url`. Return False if it already was one.

    The bytes go to a temporary file beside `dest` and are hashed as they stream; `dest` appears
    (by rename) only after the MD5 matched, so a failed or interrupted download leaves nothing
    that a later run could mistake for a good archive. `progress(bytes_so_far, total_or_None)`
    is called after every chunk.
    """
    dest = Path(dest)
    if dest.exists() and md5_of(dest) == md5:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.download{atomic.TMP_SUFFIX}")
    attempts = retries + 1
    try:
        for attempt in range(1, attempts + 1):
            try:
                actual = _stream_to(url, tmp, timeout_s, progress)
                break
            except UserError:
                raise
            except Exception as e:  # network trouble: retry after a growing pause (1 s, 2 s, ...)
                if attempt == attempts or not _is_retryable(e):
                    reason = getattr(e, "reason", None) or e
                    raise UserError(f"could not download {url}: {reason} (attempt {attempt} of {attempts}). "
                                    "With the archive on disk, set data.url to its path and data.md5 "
                                    "to its checksum") from None
                time.sleep(backoff_s * attempt)
        if actual != md5:
            raise ChecksumError(f"checksum mismatch for {url}: expected md5 {md5}, got {actual}; "
                                "the download was discarded (set data.md5 if you use another archive)")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _too_large(url: str, what: str) -> UserError:
    return UserError(f"refusing the download from {url}: {what}, more than the {MAX_DOWNLOAD_BYTES:,}-byte limit "
                     "(the CIFAR-10 archive is 170,498,071 bytes); nothing was kept")


def _stream_to(url: str, tmp: Path, timeout_s: float, progress: Callable | None) -> str:
    """Stream `url` into `tmp` (fsynced); return the MD5 of what arrived."""
    h = hashlib.md5()
    src, total = _open_source(url, timeout_s)
    done = 0
    with src:
        if total is not None and total > MAX_DOWNLOAD_BYTES:
            raise _too_large(url, f"the source announces {total:,} bytes")
        with open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                done += len(chunk)
                if done > MAX_DOWNLOAD_BYTES:  # a server that lies about, or omits, its Content-Length
                    raise _too_large(url, f"{done:,} bytes arrived and the stream went on")
                h.update(chunk)
                out.write(chunk)
                if progress:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
    if total is not None and done != total:
        raise ConnectionError(f"connection closed after {done} of {total} bytes")
    return h.hexdigest()


# ---------------------------------------------------------------- archive and pickles
class _BatchUnpickler(pickle.Unpickler):
    """Knows only the globals that a pickled numpy uint8 array needs; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise UnsafeArchiveError(f"refusing to unpickle: the batch names the global {module}.{name}, "
                                     "which a CIFAR-10 batch never needs")
        return super().find_class(module, name)


def load_batch(raw: bytes, what: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except UnsafeArchiveError as e:
        raise UnsafeArchiveError(f"{what}: {e}") from None
    except Exception as e:
        raise UserError(f"{what}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _check_member(m: tarfile.TarInfo) -> None:
    p = PurePosixPath(m.name)
    if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")):
        raise UnsafeArchiveError(f"refusing archive: member {m.name!r} would land outside the target folder")
    if not (m.isfile() or m.isdir()) or m.issparse():
        raise UnsafeArchiveError(f"refusing archive: member {m.name!r} is a link or special file")
    limit = MAX_BATCH_BYTES if PurePosixPath(m.name).name in (*TRAIN_BATCHES, TEST_BATCH) else MAX_OTHER_BYTES
    if m.size > limit:  # from the header: nothing of the member has been decompressed yet
        raise UnsafeArchiveError(f"refusing archive: member {m.name!r} claims {m.size:,} bytes, more than the "
                                 f"{limit:,} any CIFAR-10 file needs (a data batch is about 31,000,000)")


class _BoundedReader(io.RawIOBase):
    """The decompressed tar stream, cut off after MAX_TAR_BYTES: whatever tarfile reads (member
    data, or a pax/GNU long-name header, which it reads whole before we see the member), it
    decompresses no more than that."""

    def __init__(self, raw: io.BufferedIOBase, what: Path) -> None:
        self.raw, self.what, self.count = raw, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.raw.readinto(buf)
        self.count += n
        if self.count > MAX_TAR_BYTES:
            raise UnsafeArchiveError(f"refusing archive {self.what}: more than {MAX_TAR_BYTES:,} bytes once "
                                     "decompressed (the CIFAR-10 files are about 186,000,000 bytes in all)")
        return n


def read_archive(archive: Path) -> dict[str, bytes]:
    """Read the batch files from the tar.gz into memory, checking every member from its header.

    Nothing is written to disk and nothing is unpickled here. The tar is read as one forward
    stream, member by member (never `getmembers()`, which would walk every header first): at
    most MAX_MEMBERS entries, each within its size limit, MAX_TAR_BYTES in all, so memory and
    time stay bounded by the real dataset's size whatever the archive claims.
    """
    wanted = {f"{BATCH_DIR}/{n}" for n in [*TRAIN_BATCHES, TEST_BATCH, META]}
    found: dict[str, bytes] = {}
    try:
        with gzip.open(archive, "rb") as gz, \
                tarfile.open(fileobj=io.BufferedReader(_BoundedReader(gz, archive), CHUNK), mode="r|") as tar:
            for count, m in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise UnsafeArchiveError(f"refusing archive {archive}: more than {MAX_MEMBERS} members "
                                             "(CIFAR-10 has 8)")
                _check_member(m)
                if m.name in wanted and m.isfile():
                    found[m.name.split("/", 1)[1]] = tar.extractfile(m).read()
    except (tarfile.ReadError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{archive}: truncated or not a gzip tar archive ({e})") from None
    missing = sorted(w for w in wanted if w.split("/", 1)[1] not in found)
    if missing:
        raise UserError(f"{archive}: not a CIFAR-10 python archive, missing {', '.join(missing)}")
    return found


@dataclass(frozen=True)
class Cifar10Arrays:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8, HWC
    train_labels: np.ndarray  # (N,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def _batch_arrays(batch: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{what}: 'data' must be a uint8 array of shape (n, 3072)")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],):
        raise UserError(f"{what}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):  # before any cast can wrap them
        raise UserError(f"{what}: labels must be 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    # Each row is 1024 red, 1024 green, 1024 blue values: -> (n, 3, 32, 32) -> HWC for compact gathers.
    # Contiguous here, per batch: concatenating transposed views would keep their layout and cost
    # one more full copy of the training set (155 MB) to make it contiguous afterwards.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def arrays_from_archive(archive: Path) -> Cifar10Arrays:
    files = read_archive(archive)
    meta = load_batch(files.pop(META), META)
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in meta.get("label_names", [])]
    # pop: each batch's pickled bytes are freed once its array exists, so the peak holds the
    # dataset about twice (pickles + arrays, then the batches + their concatenation).
    train = [_batch_arrays(load_batch(files.pop(n), n), n) for n in TRAIN_BATCHES]
    test_images, test_labels = _batch_arrays(load_batch(files.pop(TEST_BATCH), TEST_BATCH), TEST_BATCH)
    arrays = Cifar10Arrays(
        train_images=np.ascontiguousarray(np.concatenate([t[0] for t in train])),
        train_labels=np.concatenate([t[1] for t in train]).astype(np.uint8),
        test_images=np.ascontiguousarray(test_images),
        test_labels=test_labels.astype(np.uint8),
        classes=classes,
    )
    check_arrays(arrays)
    return arrays


def check_arrays(a: Cifar10Arrays) -> None:
    """Shapes, dtypes, label range and per-class counts: fail here, not ten epochs later."""
    if len(a.classes) != NUM_CLASSES:
        raise UserError(f"batches.meta lists {len(a.classes)} class names, expected {NUM_CLASSES}")
    for split, images, labels in (("train", a.train_images, a.train_labels), ("test", a.test_images, a.test_labels)):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise UserError(f"{split} images: expected uint8 (n, 32, 32, 3), got {images.dtype} {images.shape}")
        if len(images) == 0 or len(labels) != len(images):
            raise UserError(f"{split}: {len(images)} images and {len(labels)} labels")
        if labels.max() >= NUM_CLASSES:
            raise UserError(f"{split} labels: found {int(labels.max())}, expected 0..{NUM_CLASSES - 1}")
    missing = [a.classes[c] for c in range(NUM_CLASSES) if not (a.train_labels == c).any()]
    if missing:
        raise UserError(f"train set has no images of class(es) {', '.join(missing)}")


def class_counts(labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=NUM_CLASSES).tolist()


def save_arrays(a: Cifar10Arrays, path: Path) -> None:
    check_arrays(a)
    # Uncompressed npz: 184 MB for the full set, loads with one read per array.
    with atomic.atomic_open(path, "wb") as f:
        np.savez(f, train_images=a.train_images, train_labels=a.train_labels,
                 test_images=a.test_images, test_labels=a.test_labels, classes=np.array(a.classes))


def load_arrays(path: Path) -> Cifar10Arrays:
    train_x, train_y, classes = load_part(path, "train")
    test_x, test_y, _ = load_part(path, "test")
    return Cifar10Arrays(train_x, train_y, test_x, test_y, classes)


def load_part(path: Path, part: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One part's images and labels, and the class names, without reading the other part. The
    images are a read-only memory map of the file (save_arrays stores them uncompressed): the
    stages index their split out of it, and nothing is read twice. Loading the 154 MB of training
    images with np.load took 0.6-2.9 s on a 2-core CPU; mapping them takes under 1 ms."""
    try:
        with np.load(path, allow_pickle=False) as z:
            labels, classes = z[f"{part}_labels"], [str(c) for c in z["classes"]]
            images = _mapped(path, f"{part}_images.npy")
            if images is None:
                images = z[f"{part}_images"]
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run the download stage first (dvc repro download)") from None
    return images, labels, classes


def _mapped(path: Path, member: str) -> np.ndarray | None:
    """The npz member `member` as a read-only memory map; None if it is compressed (np.load reads it then)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with zf.open(info) as f:  # the .npy header: format version, then dtype, shape and order
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            header = f.tell()
    with open(path, "rb") as f:  # the member's data starts after its local file header (30 bytes + name + extra)
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    offset = info.header_offset + 30 + name_len + extra_len + header
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
