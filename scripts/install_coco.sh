#!/usr/bin/env bash
# Install lrpq with its COCO extra (mmdet 3.3 + mmcv 2.1 with CPU ops) into a fresh virtual environment.
#
# mmdet 3.3.0 accepts mmcv >= 2.0.0rc4, < 2.2.0, and Mask R-CNN needs mmcv's compiled ops (NMS,
# RoIAlign), which PyPI ships only as a source distribution. mmcv 2.1.0's setup.py compiles them with
# -std=c++17, but torch 2.14's headers need C++20 ("C++20 or later compatible compiler is required to
# use ATen"), so the flag is patched before the build. Ops are built for the CPU unless FORCE_CUDA=1.
#
# Usage: bash scripts/install_coco.sh [VENV_DIR]      (default .venv-coco; run from anywhere)
#        MAX_JOBS=N sets the compiler's parallel jobs (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-coco}
started=$SECONDS

python3 -m venv --clear "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e ".[dev]"
pip install -q "setuptools<70" wheel ninja # mmcv 2.1.0's setup.py imports pkg_resources

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
pip download -q mmcv==2.1.0 --no-deps --no-binary :all: --no-build-isolation -d "$build"
tar xzf "$build/mmcv-2.1.0.tar.gz" -C "$build"
sed -i "s/extra_compile_args\['cxx'\] = \['-std=c++17'\]/extra_compile_args['cxx'] = ['-std=c++20']/" \
    "$build/mmcv-2.1.0/setup.py"
grep -q "std=c++20" "$build/mmcv-2.1.0/setup.py" || { echo "install_coco: the C++20 patch did not apply" >&2; exit 1; }
MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install -q --no-build-isolation "$build/mmcv-2.1.0"

pip install -q -e ".[dev,coco]" # mmcv 2.1.0 is installed, so the extra only adds mmdet and mmengine
python -c "import mmcv.ops, mmdet.apis; print('mmdet', mmdet.__version__, 'with mmcv', mmcv.__version__, 'ops')"
echo "install_coco: done in $((SECONDS - started)) s; activate with: . $venv/bin/activate"
