#!/usr/bin/env bash
# The peers the GPU image lacks (it has torch, triton and transformers), as wheels in .whl/ for the
# device call to carry (`carry: [".whl"]`; bench/gpu_check.sh installs them from there). Run here,
# where PyPI is reachable; --no-deps: each missing dependency is named here too.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl liger-kernel cut-cross-entropy
ls -la .whl
