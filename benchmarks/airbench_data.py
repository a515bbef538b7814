"""Write our verified arrays as the data cache airbench94 reads, so it runs offline on the same images.

airbench's loader reads `<dir>/train.pt` and `<dir>/test.pt` (dicts of 'images' uint8 NHWC,
'labels' int64, 'classes') and downloads only when they are missing.

  python benchmarks/airbench_data.py --archive cifar-10-python.tar.gz --out /tmp/airbench/cifar10
"""
import argparse
from pathlib import Path

import torch

from cifarpipe.data import archive as data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    a = data.arrays_from_archive(args.archive)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, images, labels in (("train", a.train_images, a.train_labels), ("test", a.test_images, a.test_labels)):
        torch.save({"images": torch.from_numpy(images.copy()), "labels": torch.from_numpy(labels).long(),
                    "classes": a.classes}, args.out / f"{name}.pt")
    print(f"wrote {args.out}/train.pt ({len(a.train_labels)}) and test.pt ({len(a.test_labels)})")


if __name__ == "__main__":
    main()
