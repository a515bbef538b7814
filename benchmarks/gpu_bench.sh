#!/usr/bin/env bash
# The whole GPU measurement in one short run on the lent GPU machine (no network, 64 MiB carried).
#
# Prepare here (nothing of this is committed; .gpu/ and .whl/ are listed in .git/info/exclude):
#   mkdir -p .gpu && cp ../shared/datasets/{cifar10_jpeg.npz,build_cifar10_archive.py} .gpu/
#   cp <airbench snapshot>/airbench94_muon.py .gpu/          # github.com/KellerJordan/cifar10-airbench
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   (the GPU image lacks pydantic; pin the versions `.venv/bin/pip show` reports here)
# Run there (device tool): carry [".gpu", ".whl"], command `bash benchmarks/gpu_bench.sh`, timeout 600 s.
# Know when reading the figures: the GPU image has its own torch (2.11 with Python 3.12 as of
# 2026-11, not our pinned 2.14.1; too large to carry), and airbench94 trains on all 50,000 training
# images while our pipeline trains on 42,500 (15 % is the plateau scheduler's validation set).
# Writes $OUT/gpu.json (our engine, timed to airbench94's accuracy), $OUT/airbench.{log,json} (airbench94
# on the same data and card) and $OUT/gpu.txt (the card).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$REPO/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 .gpu/build_cifar10_archive.py /tmp/cifar-10-python.tar.gz

# airbench94 on the same images and card: its data cache written from our verified arrays.
mkdir -p /tmp/airbench && cp .gpu/airbench94_muon.py /tmp/airbench/
python3 benchmarks/airbench_data.py --archive /tmp/cifar-10-python.tar.gz --out /tmp/airbench/cifar10
# 5 timed runs instead of its default 200 (one warm-up run first, as it does itself).
sed -i 's/for run in range(200)/for run in range(5)/' /tmp/airbench/airbench94_muon.py
(cd /tmp/airbench && timeout 200 python3 airbench94_muon.py) 2>&1 | tee "$OUT/airbench.log" || true
# Its result: mean TTA test accuracy and median time of the timed runs (its table's "eval" rows;
# the first one is the warm-up run). Empty if it failed: then there is no target to time.
TARGET=$(python3 - "$OUT/airbench.log" "$OUT/airbench.json" <<'PY' || true
import json, statistics, sys
rows = [[c.strip() for c in line.split("|")[1:-1]] for line in open(sys.argv[1]) if line.startswith("|")]
evals = [r for r in rows if len(r) == 6 and r[1] == "eval"][1:]
if evals:
    accs, secs = [float(r[4]) for r in evals], [float(r[5]) for r in evals]
    json.dump({"runs": len(evals), "tta_accuracy_mean": statistics.mean(accs), "accuracies": accs,
               "seconds_median": statistics.median(secs), "seconds": secs}, open(sys.argv[2], "w"), indent=1)
    print(f"{statistics.mean(accs):.4f}")
PY
)
echo "airbench94: mean accuracy ${TARGET:-unknown}"

# Ours on the same card and data: the course CNN (params.yaml, fast recipe) and three cifar_resnet
# recipes, each timed to airbench94's accuracy. The course loop (batch 8: ~150 s on a GPU) is
# skipped here: the GPU target is airbench94; the course comparison is the CPU benchmark's.
# MLflow is not installed there; its overhead is measured on the CPU.
R="train.label_smoothing=0.1 evaluate.tta_flip=true"
timeout 330 python3 benchmarks/bench.py --archive /tmp/cifar-10-python.tar.gz --device cuda --skip course \
  --skip tracking ${TARGET:+--target $TARGET} \
  --resnet "train.batch_size=512 train.epochs=20 train.optimizer.lr=0.002 train.scheduler.patience=0 $R" \
  --resnet "train.batch_size=512 train.epochs=30 train.optimizer.lr=0.002 train.scheduler.patience=1 $R" \
  --resnet "train.batch_size=1024 train.epochs=30 train.optimizer.lr=0.003 train.scheduler.patience=1 $R" \
  --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
