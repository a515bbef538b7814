#!/usr/bin/env bash
# The whole GPU measurement in one short run on the lent GPU machine (no network, 64 MiB carried).
#
# Prepare here (nothing of this is committed; .gpu/ and .whl/ are listed in .git/info/exclude):
#   mkdir -p .gpu && cp ../shared/datasets/{cifar10_jpeg.npz,build_cifar10_archive.py} .gpu/
#   cp <airbench snapshot>/airbench94_muon.py .gpu/          # github.com/KellerJordan/cifar10-airbench
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl pydantic pydantic-core annotated-types typing-inspection   # the GPU image lacks pydantic
# Run there (device tool): carry [".gpu", ".whl"], command `bash benchmarks/gpu_bench.sh`, timeout 600 s.
# Writes $OUT/gpu.json (our engine beside the course loop) and $OUT/airbench.log (airbench94 on the same data).
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
(cd /tmp/airbench && timeout 240 python3 airbench94_muon.py) 2>&1 | tee "$OUT/airbench.log" || true

# Ours beside the course loop; MLflow is not installed there, its overhead is measured on the CPU.
timeout 300 python3 benchmarks/bench.py --archive /tmp/cifar-10-python.tar.gz --device cuda \
  --resnet-set train.batch_size=512 --resnet-set train.epochs=30 --skip tracking \
  --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
