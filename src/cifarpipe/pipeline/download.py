"""The download stage's body: fetch and verify the CIFAR-10 archive, write the uint8 arrays.

A present archive whose MD5 matches is not fetched again.
"""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from cifarpipe.config import load_params
from cifarpipe.data import archive


def main(archive_path: Path, out: Path, params_path: Path) -> None:
    params = load_params(params_path).data
    out.unlink(missing_ok=True)  # a failed run must not leave the previous params' arrays

    with tqdm(desc="download", unit="B", unit_scale=True, unit_divisor=1024, mininterval=0.5) as bar:
        def progress(done: int, total: int | None) -> None:
            bar.total = total
            bar.update(done - bar.n)

        fetched = archive.download(params.url, archive_path, params.md5, retries=params.retries,
                                   timeout_s=params.timeout_s, progress=progress)
    print(f"{archive_path}: md5 {params.md5} verified" + ("" if fetched else " (already present, not fetched again)"))

    arrays = archive.arrays_from_archive(archive_path)
    archive.save_arrays(arrays, out)
    train_counts, test_counts = archive.class_counts(arrays.train_labels), archive.class_counts(arrays.test_labels)
    print(f"{out}: train {arrays.train_images.shape}, test {arrays.test_images.shape}, uint8")
    print(f"{'class':<12}{'train':>7}{'test':>7}")
    for name, n_train, n_test in zip(arrays.classes, train_counts, test_counts):
        print(f"{name:<12}{n_train:>7}{n_test:>7}")
