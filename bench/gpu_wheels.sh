#!/usr/bin/env bash
# Download, on a machine with network, the wheels bench/gpu.py needs on a GPU machine without network beyond
# torch, triton and minidit's own dependencies: diffusers (pinned as in pyproject.toml's test extra) and the rest
# of its dependency closure. ~14 MB, into a git-ignored folder that the device tool can carry.
#
#   bash bench/gpu_wheels.sh [DIR [PYTHON_VERSION...]]     # default: bench/.wheels 3.12 (the lent machine's Python)
#
# Then, on the GPU machine (the repository copied there, DIR beside it; python3 with torch + triton):
#   PYTHONUNBUFFERED=1 python3 bench/gpu.py --out "$OUT"     # installs from bench/.wheels first if diffusers is missing
# (through the device tool: carry=["bench/.wheels"]), and back here: python bench/gpu.py --record-from FOLDER
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-bench/.wheels}"
shift || true
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.12)
req="$(python bench/gpu_env.py pin)"
mkdir -p "$dir"
for v in "${versions[@]}"; do
  abi="cp${v/./}"
  python -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$dir" \
    --python-version "$v" --implementation cp --abi "$abi" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any "$req"
done
python bench/gpu_env.py prune "$dir"
echo "$req and its dependencies for Python ${versions[*]} in $dir: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
