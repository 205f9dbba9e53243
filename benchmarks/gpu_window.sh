#!/usr/bin/env bash
# Prepare what a GPU window's device calls carry, here, before the first call (device time is
# scarce: nothing is fetched or copied on the GPU machine). Run from the repository root:
#
#   bash benchmarks/gpu_window.sh            # fills .gpu-data/ and .whl/ (both git-ignored)
#
# then, with the device tool, carry [".whl", ".gpu-data"] and run the command it prints.
# The GPU machine has torch, torchvision, numpy, scikit-learn, typer and rich, but not SQLAlchemy:
# its cp312 wheel travels and is installed there with --target.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${SISA_DATASETS:-../shared/datasets}
[ -d .gpu-data ] && chmod -R u+w .gpu-data && rm -rf .gpu-data
for name in FashionMNIST MNIST; do  # the official .gz files, as torchvision lays them out
    mkdir -p ".gpu-data/$name"
    cp -r "$data/$name/raw" ".gpu-data/$name/"
done
chmod -R u+w .gpu-data  # the shared copies are read-only; these are ours to replace
version=$(python3 -c 'import sqlalchemy; print(sqlalchemy.__version__)' 2>/dev/null \
          || .venv/bin/python -c 'import sqlalchemy; print(sqlalchemy.__version__)')
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "sqlalchemy==$version"
du -sh .gpu-data .whl
cat <<'CMD'
Device call 1 (then call 2 the same with --stage breakdown --stage step, after copying call 1's
gpu_h100.json into benchmarks/results/ so it merges):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit; export PYTHONUNBUFFERED=1; cp benchmarks/results/gpu_h100.json $OUT/; python3 -m benchmarks.gpu --data-dir .gpu-data --results-dir $OUT --stage sisa --stage concurrent
CMD
