#!/usr/bin/env bash
# Fill .gpu/ (git-ignored through .git/info/exclude) with what benchmarks/gpu_run.sh needs on the GPU
# machine, within the 64 MiB a call carries (the npz alone is 53 MiB):
#   cifar10_jpeg.npz + build_cifar10_archive.py   the real images (../shared/datasets)
#   airbench94.py, airbench94_muon.py             from a snapshot of github.com/KellerJordan/cifar10-airbench
#   site.tar.xz                                   the Python packages the GPU image lacks (it has torch 2.11,
#                                                 numpy, pandas, ... but not mlflow, pydantic, sqlalchemy)
#   bash benchmarks/gpu_prepare.sh <airbench snapshot (a git dir or checkout)>
# The packages are the versions this project's .venv has, for CPython 3.12 on x86-64 Linux, unpacked
# and trimmed to fit: MLflow's web UI (27 MB of JavaScript; the store is viewed here), SQLAlchemy's
# optional compiled speed-ups (it falls back to pure Python), test suites, server-side and UI-only parts, and the Databricks SDK / google-auth
# (MLflow only looks them up; an empty `databricks` namespace answers that) are left out.
set -euo pipefail
AIRBENCH=${1:?path to an airbench snapshot}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}  # the project's environment (a worktree may use another checkout's)
PIP="$VENV/bin/python -m pip"
mkdir -p "$REPO/.gpu"
grep -qx '/.gpu/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$REPO/.git/info/exclude"
cp "$REPO/../shared/datasets/cifar10_jpeg.npz" "$REPO/../shared/datasets/build_cifar10_archive.py" "$REPO/.gpu/"
git -C "$AIRBENCH" show HEAD:legacy/airbench94.py > "$REPO/.gpu/airbench94.py"
git -C "$AIRBENCH" show HEAD:airbench94_muon.py > "$REPO/.gpu/airbench94_muon.py"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
version() { "$VENV/bin/pip" show "$1" 2>/dev/null | awk '/^Version/{print $2}'; }
for p in mlflow mlflow-skinny mlflow-tracing cachetools fastapi gitpython gitdb smmap importlib_metadata \
         opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions python-dotenv \
         sqlparse starlette uvicorn alembic mako sqlalchemy huey pydantic pydantic-core annotated-types \
         typing-inspection cryptography cffi pycparser; do
  echo "$p==$(version "$p")"
done > "$TMP/requirements.txt"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$TMP/wheels" -r "$TMP/requirements.txt"
mkdir "$TMP/site"
for w in "$TMP"/wheels/*.whl; do unzip -qo "$w" -d "$TMP/site"; done
rm -rf "$TMP/site/mlflow/server/js"
find "$TMP/site/sqlalchemy" -name '*.so' -delete
# Test suites and SQLAlchemy's test harness (only its own tests import it), the tracking server's
# auth plugin (server side only, an optional extra) and the UI's chat assistant (imported lazily by
# the CLI's agent hints): with them the call was 64.06 MiB, over its 64.
rm -rf "$TMP/site/sqlalchemy/testing" "$TMP/site/huey/tests" "$TMP/site/mlflow/assistant" "$TMP/site/mlflow/server/auth"
mkdir -p "$TMP/site/databricks"
find "$TMP/site" -name __pycache__ -prune -exec rm -rf {} +
XZ_OPT=-9e tar -cJf "$REPO/.gpu/site.tar.xz" -C "$TMP/site" .
GPU=$(du -cb "$REPO"/.gpu/* | tail -1 | cut -f1)
TRACKED=$(git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 du -cb) | tail -1 | cut -f1)
awk -v g="$GPU" -v t="$TRACKED" 'BEGIN {printf "%.2f MiB in .gpu/ + %.2f MiB of tracked files = %.2f MiB (a call carries at most 64)\n", g/1048576, t/1048576, (g+t)/1048576}'
