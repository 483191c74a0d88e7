#!/usr/bin/env bash
# The seeds' claims re-measured over seeds with `robustlab repeat` (docs/results.md, "Claims over seeds"):
# resumable (run it again after a kill or in a later session: finished seeds are kept), one seed at a time per
# config with one thread each, so it can run in the background beside other work.
#
#   bash scripts/repeat-tables.sh [OUT]        # OUT: where the repeats go (default repeats/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-repeats}
seeds=${SEEDS:-3}
pgd20="pgd:norm=linf,eps=0.3,steps=20,step_size=0.0375"
mma="mma:eps=0.3,steps=20,step_size=0.0375,k=3,confidence=50"
# PART vs its base methods (PGD-20 and MMA on the 1,000 test images)
for m in at part trades part-t mart part-m; do
  robustlab repeat --config configs/part/mnist5k-$m.yaml --seeds "$seeds" --out-dir "$out/part-$m" \
    --attack "$pgd20" --attack "$mma" --n-samples 1000 --jobs 1 --threads 1
done
