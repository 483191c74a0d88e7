#!/usr/bin/env bash
# The seeds' claims re-measured over seeds with `robustlab repeat` (docs/results.md, "Claims over seeds"):
# resumable (run it again after a kill or in a later session: finished seeds are kept), one seed at a time per
# config with one thread each, so it can run in the background beside other work.
#
#   bash scripts/repeat-tables.sh [OUT]        # OUT: where the repeats go (default results/repeats, whose small
#                                              # files are committed: checkpoints and logs are ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/repeats}
seeds=${SEEDS:-3}
pgd20="pgd:norm=linf,eps=0.3,steps=20,step_size=0.0375"
mma="mma:eps=0.3,steps=20,step_size=0.0375,k=3,confidence=50"
panel="multi-norm:eps_linf=0.3,eps_l2=2.0,eps_l1=10"
# PART vs its base methods (PGD-20 and MMA on the 1,000 test images)
for m in at part trades part-t mart part-m; do
  robustlab repeat --config configs/part/mnist5k-$m.yaml --seeds "$seeds" --out-dir "$out/part-$m" \
    --attack "$pgd20" --attack "$mma" --n-samples 1000 --jobs 1 --threads 1
done
# MNG-AC and the multi-perturbation baselines: the panel without its two costliest attacks (AutoAttack,
# Brendel-Bethge) on 1,000 images, then the full panel on 500 images of the same seeds' checkpoints (union and avg
# over every attack are read there)
for m in mng-ac adv-avg adv-max msd sat sat-ac adv-inf; do
  robustlab repeat --config configs/mng-ac/mnist5k-$m.yaml --seeds "$seeds" --out-dir "$out/mng-ac-$m" \
    --attack "$panel,autoattack=false,brendel_bethge=false" --n-samples 1000 --jobs 1 --threads 1
done
for m in mng-ac adv-avg adv-max msd sat sat-ac adv-inf; do
  robustlab repeat --config configs/mng-ac/mnist5k-$m.yaml --seeds "$seeds" --out-dir "$out/mng-ac-$m-full" \
    --trained-from "$out/mng-ac-$m" --attack "$panel" --n-samples 500 --jobs 1 --threads 1
done
# the adversary critic's ordering (rho of DeepFool, C&W and the critic attack)
for m in reference fgsm-at vat margin critic; do
  robustlab repeat --config configs/critic/mlp-$m-mnist5k.yaml --seeds "$seeds" --out-dir "$out/critic-$m" \
    --attack critic-rho --n-samples 200 --jobs 1 --threads 1
done
# AutoAttack columns of the PART table: AutoAttack standard on 500 images of the same seeds' checkpoints
for m in at part trades part-t mart part-m; do
  robustlab repeat --config configs/part/mnist5k-$m.yaml --seeds "$seeds" --out-dir "$out/part-$m-aa" \
    --trained-from "$out/part-$m" --attack "autoattack:norm=linf,eps=0.3" --n-samples 500 --jobs 1 --threads 1
done
# CWAT vs OWAT: mAP and the per-class AP's evenness under CWA (the spec's 3-seed comparison)
for m in cwat owat; do
  robustlab repeat --config configs/$m-mnistdet-coco.yaml --seeds "$seeds" --out-dir "$out/det-$m" \
    --attack "cwa:eps=8" --n-samples 200 --jobs 1 --threads 1
done
