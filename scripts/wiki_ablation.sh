#!/usr/bin/env bash
# DistilBERT's ablation at our scale (README "Results"): teacher bert-mini-wiki-teacher (4x256),
# students with 2 layers, same steps/data/seed:
#   (a) teacher init + triple loss, (b) teacher init + MLM only, (c) random init + MLM only.
# Usage: scripts/wiki_ablation.sh [RUNS_DIR] [extra --config.* overrides]
# Run from the repo root (configs/wiki_mini.py reads ../shared). ~25 min per student on 2 CPU cores.
set -euo pipefail
RUNS=${1:-runs/wiki_ablation}; shift || true
COMMON=(--config configs/wiki_mini.py --config.data.cache_dir="$RUNS/data_cache" "$@")
MLM_ONLY=(--config.distill.alpha_ce=0 --config.distill.alpha_cos=0)
python -m flaxdistil.main "${COMMON[@]}" --workdir "$RUNS/a_distil"
python -m flaxdistil.main "${COMMON[@]}" --workdir "$RUNS/b_mlm_teacher_init" "${MLM_ONLY[@]}"
python -m flaxdistil.main "${COMMON[@]}" --workdir "$RUNS/c_mlm_random_init" "${MLM_ONLY[@]}" \
  --config.student.init=random
python scripts/results_table.py "$RUNS"/a_distil "$RUNS"/b_mlm_teacher_init "$RUNS"/c_mlm_random_init
