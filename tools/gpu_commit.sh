#!/usr/bin/env bash
# Run before a lent-GPU call: records the checkout's commit (+dirty) in .gpu/commit.txt, which
# tools/gpu_env.sh exports as VISIONATTN_COMMIT for the benchmarks' JSON.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .gpu
sha=$(git rev-parse --short HEAD)
[ -n "$(git status --porcelain --untracked-files=no)" ] && sha="$sha+dirty"
echo "$sha" > .gpu/commit.txt
cat .gpu/commit.txt
