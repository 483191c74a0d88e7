#!/usr/bin/env bash
# The seeds' claims re-measured over seeds with `robustlab repeat` (docs/results.md, "Claims over seeds"):
# resumable (run it again after a kill or in a later session: finished seeds are kept), one seed at a time per
# config with one thread each, so it can run in the background beside other work.
#
#   [SEEDS=N] bash scripts/repeat-tables.sh [OUT [SECTION ...]]
#   OUT: where the repeats go (default results/repeats, whose small files are committed: checkpoints and logs are
#   ignored)
#   SECTION: part, mng-ac, mng-ac-full, critic, part-aa, det, wpgd (default: all, in this order; mng-ac-full needs
#   mng-ac's checkpoints and part-aa part's, which they train where missing)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/repeats}
shift || true
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(part mng-ac mng-ac-full critic part-aa det wpgd)
# seeds per config: 5 where a seed's run takes minutes (det, wpgd), else 3; SEEDS=N sets every section's
few=${SEEDS:-3} many=${SEEDS:-5}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per job (metric visual has no --threads)
pgd20="pgd:norm=linf,eps=0.3,steps=20,step_size=0.0375"
mma="mma:eps=0.3,steps=20,step_size=0.0375,k=3,confidence=50"
panel="multi-norm:eps_linf=0.3,eps_l2=2.0,eps_l1=10"
# PART vs its base methods (PGD-20 and MMA on the 1,000 test images)
part() {
  for m in at part trades part-t mart part-m; do
    robustlab repeat --config configs/part/mnist5k-$m.yaml --seeds "$few" --out-dir "$out/part-$m" \
      --attack "$pgd20" --attack "$mma" --n-samples 1000 --jobs 1 --threads 1
  done
}
# MNG-AC and the multi-perturbation baselines: the panel without its two costliest attacks (AutoAttack,
# Brendel-Bethge) on 1,000 images, then the panel with AutoAttack on 500 images of the same seeds' checkpoints (union
# and avg over the attacks are read there). Brendel-Bethge stays out of the seed repeats: it is about half of the
# panel's time (some 6 of 14 CPU hours for the 21 runs on 500 images here) and on the single-seed full panel it never bound at l_inf and added one image
# at l_2 (docs/results.md); BB=1 puts it back.
mng_ac() {
  for m in mng-ac adv-avg adv-max msd sat sat-ac adv-inf; do
    robustlab repeat --config configs/mng-ac/mnist5k-$m.yaml --seeds "$few" --out-dir "$out/mng-ac-$m" \
      --attack "$panel,autoattack=false,brendel_bethge=false" --n-samples 1000 --jobs 1 --threads 1
  done
}
mng_ac_full() {
  bb=$([ "${BB:-0}" = 1 ] && echo true || echo false)
  for m in mng-ac adv-avg adv-max msd sat sat-ac adv-inf; do
    robustlab repeat --config configs/mng-ac/mnist5k-$m.yaml --seeds "$few" --out-dir "$out/mng-ac-$m-full" \
      --trained-from "$out/mng-ac-$m" --attack "$panel,brendel_bethge=$bb" --n-samples 500 --jobs 1 --threads 1
  done
}
# the adversary critic's ordering (rho of DeepFool, C&W and the critic attack)
critic() {
  for m in reference fgsm-at vat margin critic; do
    robustlab repeat --config configs/critic/mlp-$m-mnist5k.yaml --seeds "$few" --out-dir "$out/critic-$m" \
      --attack critic-rho --n-samples 200 --jobs 1 --threads 1
  done
}
# AutoAttack columns of the PART table: AutoAttack standard on 500 images of the same seeds' checkpoints
part_aa() {
  for m in at part trades part-t mart part-m; do
    robustlab repeat --config configs/part/mnist5k-$m.yaml --seeds "$few" --out-dir "$out/part-$m-aa" \
      --trained-from "$out/part-$m" --attack "autoattack:norm=linf,eps=0.3" --n-samples 500 --jobs 1 --threads 1
  done
}
# CWAT vs OWAT: mAP and the per-class AP's evenness under CWA (the spec's 3-seed comparison)
# Both fine-tune the one STD detector of configs/det-std-mnistdet-coco.yaml (the configs' init_from), trained here
# first, resumably; a folder kept without its checkpoint trains it again (deterministic: the same weights).
det() {
  local d="$out/det-std" run="$out/det-std/det-std-mnistdet-coco" how=()
  if [ ! -f "$d/trained" ] || [ ! -f "$run/best.safetensors" ]; then
    if [ -f "$run/train_state.safetensors" ]; then how=(--resume); elif [ -d "$run" ]; then how=(--overwrite); fi
    robustlab train --config configs/det-std-mnistdet-coco.yaml --out-dir "$d" --threads 1 "${how[@]}"
    touch "$d/trained"
  fi
  for m in cwat owat; do
    robustlab repeat --config configs/$m-mnistdet-coco.yaml --seeds "$many" --out-dir "$out/det-$m" \
      --attack "cwa:eps=8" --n-samples 200 --jobs 1 --threads 1 "init_from=$run/best.safetensors"
  done
}
# WPGD on mnist5k (docs/results.md's WPGD section) over seeds: accuracy and PGD-20 per seed, then per seed the accuracy
# gap's correlation with the visual metric (CE vs PGD-AT) and the weighted score S of the same checkpoints; the metric
# comes from one linear model (a property of the data, as in the single-seed table)
wpgd() {
  pgd_w="pgd:norm=linf,eps=0.2,steps=20,step_size=0.025"
  w="$out/wpgd-analyses"
  mkdir -p "$w"
  # WPGD trains with the visual metric: the configs name runs/wpgd-mnist5k-visual.npy, the repeats below this one
  if [ ! -f "$w/visual.npy" ]; then
    [ -f "$w/wpgd-mnist5k-linear/last.safetensors" ] ||
      robustlab train --config configs/wpgd/mnist5k-linear.yaml --out-dir "$w" --threads 1 --overwrite
    robustlab metric visual --model "$w/wpgd-mnist5k-linear/last.safetensors" --method linear_exact --per-class 1000 \
      --out "$w/visual.npy.tmp.npy" && mv "$w/visual.npy.tmp.npy" "$w/visual.npy"
  fi
  for m in ce pgd wpgd-p1 wpgd-p2.5; do
    metric=()
    [ "${m#wpgd-}" = "$m" ] || metric=("method_kwargs.metric=$w/visual.npy")
    robustlab repeat --config configs/wpgd/mnist5k-$m.yaml --seeds "$many" --out-dir "$out/wpgd-$m" \
      --attack "$pgd_w" --n-samples 1000 --jobs 1 --threads 1 "${metric[@]}"
  done
  for s in $(seq 0 $((many - 1))); do
    run() { echo "$out/wpgd-$1/seed-$s/wpgd-mnist5k-$1/best.safetensors"; }
    [ -f "$w/gap-seed$s.json" ] || robustlab analyze gap --model ce="$(run ce)" --model pgd="$(run pgd)" \
      --metric "$w/visual.npy" --out "$w/gap-seed$s.png" --threads 1
    [ -f "$w/score-seed$s.json" ] || robustlab analyze score --model pgd="$(run pgd)" --model wpgd-p1="$(run wpgd-p1)" \
      --model wpgd-p2.5="$(run wpgd-p2.5)" --metric "$w/visual.npy" --eps 0.2 --steps 20 --out "$w/score-seed$s.png" --threads 1
  done
  # the per-seed numbers with their t intervals over seeds
  python - "$w" "$many" <<'PY'
import json, sys
from pathlib import Path
from robustlab.analysis.intervals import t_interval
w, seeds = Path(sys.argv[1]), range(int(sys.argv[2]))
rows = {"gap pearson": [json.loads((w / f"gap-seed{s}.json").read_text())["pearson"] for s in seeds]}
scores = [json.loads((w / f"score-seed{s}.json").read_text())["models"] for s in seeds]
for m in ("wpgd-p1", "wpgd-p2.5"):
    rows[f"S({m}) - S(pgd)"] = [sc[m]["S"] - sc["pgd"]["S"] for sc in scores]
out = {k: {"values": v, **t_interval(v)} for k, v in rows.items()}
(w / "summary.json").write_text(json.dumps(out, indent=2))
for k, v in out.items():
    print(k, [round(x, 3) for x in v["values"]], "mean", round(v["mean"], 3), "interval", v["ci"])
PY
}
for section in "${sections[@]}"; do
  case $section in
    part|mng-ac|mng-ac-full|critic|part-aa|det|wpgd) "${section//-/_}" ;;
    *) echo "repeat-tables.sh: unknown section '$section' (valid: part mng-ac mng-ac-full critic part-aa det wpgd)" >&2
       exit 2 ;;
  esac
done
