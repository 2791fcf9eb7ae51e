#!/usr/bin/env bash
# Fetch the peers' wheels for the GPU machine into .whl/ (gitignored), where benchmarks/gpu_suite.py installs
# them offline, one folder per stage (TRL 1.12 and 1.16 conflict). The GPU machine has Python 3.12, torch,
# triton, transformers, peft, accelerate, pandas, pyarrow and xxhash, and no network; what the peers need
# beyond that is listed here. Everything carried (the tree and .whl/) must stay under 64 MiB.
#
#   bash benchmarks/fetch_wheels.sh            # every peer (bitsandbytes' wheel is ~43 MB of the ~47 MB)
#   bash benchmarks/fetch_wheels.sh --no-bnb   # without bitsandbytes (the suite does not need it)
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.whl
WITH_BNB=1
for arg in "$@"; do
  case "$arg" in
    --no-bnb) WITH_BNB=0 ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "fetch_wheels.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

# kernel peers: TRL's fused log-prob kernels (>= 1.13), Liger-Kernel, Apple's Cut Cross-Entropy;
# end-to-end peer: TRL 1.12.0 (the last PPOTrainer) and what it imports that the machine lacks.
KERNEL_PEERS=(trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
E2E_PEERS=(trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
OPTIONAL=()
[[ $WITH_BNB == 1 ]] && OPTIONAL=(bitsandbytes==0.50.2) # 8-bit AdamW and 4-bit loading (fit_table.py)

PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# one pip call per requirement: --no-deps resolves nothing, but pip still refuses two versions of trl
for req in "${KERNEL_PEERS[@]}" "${E2E_PEERS[@]}" "${OPTIONAL[@]}"; do
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$req"
done

ls -l "$DEST"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s + 0}')
limit=$((64 * 1024 * 1024))
echo "wheels: $total bytes; working tree: $tree bytes; together $((total + tree)) of $limit (64 MiB)"
if ((total + tree > limit)); then
  echo "fetch_wheels.sh: too big to carry; rerun with --no-bnb" >&2
  exit 1
fi
