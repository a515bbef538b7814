"""Stage `download`: fetch and verify the CIFAR-10 archive, write the uint8 arrays.

Reads params `data.*`; paths come from dvc.yaml. A present archive whose MD5 matches is not
fetched again.
"""
from pathlib import Path

from tqdm import tqdm

from cifarpipe import data
from cifarpipe.cli import run_stage, stage_parser
from cifarpipe.config import load_params


def main() -> None:
    ap = stage_parser(__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params(args.params).data
    args.out.unlink(missing_ok=True)  # a failed run must not leave the previous params' arrays

    with tqdm(desc="download", unit="B", unit_scale=True, unit_divisor=1024, mininterval=0.5) as bar:
        def progress(done: int, total: int | None) -> None:
            bar.total = total
            bar.update(done - bar.n)

        fetched = data.download(params.url, args.archive, params.md5, retries=params.retries,
                                timeout_s=params.timeout_s, progress=progress)
    print(f"{args.archive}: md5 {params.md5} verified" + ("" if fetched else " (already present, not fetched again)"))

    arrays = data.arrays_from_archive(args.archive)
    data.save_arrays(arrays, args.out)
    train_counts, test_counts = data.class_counts(arrays.train_labels), data.class_counts(arrays.test_labels)
    print(f"{args.out}: train {arrays.train_images.shape}, test {arrays.test_images.shape}, uint8")
    print(f"{'class':<12}{'train':>7}{'test':>7}")
    for name, n_train, n_test in zip(arrays.classes, train_counts, test_counts):
        print(f"{name:<12}{n_train:>7}{n_test:>7}")


if __name__ == "__main__":
    run_stage(main)
