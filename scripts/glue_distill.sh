#!/usr/bin/env bash
# Task distillation on one GLUE task, end to end (README "Task distillation on GLUE"):
# fine-tune the teacher, export it, distil a 2-layer student from it, fine-tune the same
# student without the teacher, export both students as DistilBertForSequenceClassification
# and check pipeline("text-classification") against the Flax students on the dev set.
#
#   scripts/glue_distill.sh sst2 [OUT=runs/glue]      # or mrpc
set -euo pipefail
TASK=${1:?usage: scripts/glue_distill.sh sst2|mrpc [out_dir]}
OUT=${2:-runs/glue}/$TASK
case $TASK in sst2) DIR=SST-2 ;; mrpc) DIR=MRPC ;; *) echo "unknown task $TASK" >&2; exit 2 ;; esac
DEV=../shared/data/glue/$DIR/dev.tsv
mkdir -p "$OUT"
run() {  # ROLE [flags]: the teacher role has no teacher; the students use the exported one
  local role=$1; shift
  python -m flaxdistil.main --config "configs/glue.py:$TASK,$role" --workdir "$OUT/$role" "$@" \
      > "$OUT/$role.log" 2>&1
}
export_() { [ -d "$OUT/${1}_hf" ] || python -m flaxdistil.export --workdir "$OUT/$1" --out "$OUT/${1}_hf"; }
run teacher && export_ teacher
run distill --config.teacher.path="$OUT/teacher_hf" && export_ distill
run finetune --config.teacher.path="$OUT/teacher_hf" && export_ finetune
for role in teacher distill finetune; do
  python scripts/glue_pipeline_check.py --task "$TASK" --tsv "$DEV" --workdir "$OUT/$role" \
      --hf "$OUT/${role}_hf" --json_out "$OUT/${role}_check.json"
done
