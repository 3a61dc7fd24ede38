#!/usr/bin/env bash
# DistilBERT's ablation (Sanh et al., 2019, Table 4) with the MiniLM teacher (docs/results.md):
# teacher ../shared/models/minilm-l6-mlm-wiki (6 x 384), students 3 x 384, same 300 steps, data,
# seed and masking (configs/minilm_mlm_wiki.py):
#   (a) triple loss + teacher init, (b) without L_ce, (c) without L_cos, (d) without L_mlm,
#   (e) random init + triple loss;
# then scripts/evaluate.py on valid (first 512 sequences, the teacher README's protocol) and all of
# test (one fixed masking, paired) and the table beside the paper's deltas. (a) is exported as
# soon as it is done (RUNS/a_hf, DistilBertForMaskedLM: the general-distilled student of GLUE).
# Usage: scripts/minilm_ablation.sh [RUNS_DIR] [extra --config.* overrides]
# Run from the repo root. ~1 h per student on 2 idle CPU cores; rerunning resumes.
set -euo pipefail
RUNS=${1:-runs/minilm_ablation}; shift || true
CONFIG=configs/minilm_mlm_wiki.py
COMMON=(--config.data.cache_dir="$RUNS/data_cache" "$@")
ROWS=(a: b_no_ce:no_ce c_no_cos:no_cos d_no_mlm:no_mlm e_random:random)  # workdir:variant
mkdir -p "$RUNS"
for row in "${ROWS[@]}"; do
  wd=${row%%:*} variant=${row#*:}
  python -m flaxdistil.main --config "$CONFIG${variant:+:$variant}" --workdir "$RUNS/$wd" \
      "${COMMON[@]}" >> "$RUNS/$wd.log" 2>&1
  if [ "$wd" = a ] && [ ! -d "$RUNS/a_hf" ]; then
    python -m flaxdistil.export --workdir "$RUNS/a" --out "$RUNS/a_hf"
  fi
done
WDS=("${ROWS[@]/%:*/}"); WDS=("${WDS[@]/#/$RUNS/}")
TEACHER=../shared/models/minilm-l6-mlm-wiki
WIKI=../shared/data/wikipedia-en-2018
python scripts/evaluate.py --files $WIKI/valid.txt --num_sequences 512 --teacher $TEACHER \
    --cache_dir "$RUNS/data_cache" --json_out "$RUNS/valid.json" "${WDS[@]}" > "$RUNS/valid.md"
python scripts/evaluate.py --files $WIKI/test.txt --teacher $TEACHER \
    --cache_dir "$RUNS/data_cache" --json_out "$RUNS/test.json" "${WDS[@]}" > "$RUNS/test.md"
python scripts/ablation_table.py --json valid="$RUNS/valid.json" --json test="$RUNS/test.json"
