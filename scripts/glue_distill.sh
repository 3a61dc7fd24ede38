#!/usr/bin/env bash
# Task distillation on one GLUE task, end to end (docs/results.md "Task distillation on GLUE"):
# fine-tune the teacher, export it, distil a half-depth student from it, fine-tune the same
# student without the teacher, export the students as DistilBertForSequenceClassification
# and check pipeline("text-classification") against the Flax students on the dev set.
#
#   scripts/glue_distill.sh sst2 [OUT=runs/glue]      # or mrpc; teacher bert-mini-wiki-teacher
#   TEACHER=minilm GENERAL=runs/minilm_ablation/a_hf scripts/glue_distill.sh mrpc runs/glue_minilm
#
# TEACHER: configs/glue.py's teacher choice (mini | minilm). GENERAL (optional): an exported
# general-distilled student (DistilBertForMaskedLM dir); adds the roles general_finetune (it,
# fine-tuned: DistilBERT's pipeline) and general_distill (it + task distillation: TinyBERT's two
# stages), same data, steps and seed. STUDENTS (optional): which student roles to run, default
# "distill finetune" (+ "general_distill general_finetune" with GENERAL); STUDENTS= runs the
# teacher only. Rerunning resumes;
# finished runs and exports are kept.
set -euo pipefail
TASK=${1:?usage: [TEACHER=mini|minilm] [GENERAL=dir] scripts/glue_distill.sh sst2|mrpc [out_dir]}
OUT=${2:-runs/glue}/$TASK
TEACHER=${TEACHER:-mini}
GENERAL=${GENERAL:-}
case $TASK in sst2) DIR=SST-2 ;; mrpc) DIR=MRPC ;; *) echo "unknown task $TASK" >&2; exit 2 ;; esac
DEV=../shared/data/glue/$DIR/dev.tsv
mkdir -p "$OUT"
run() {  # WORKDIR ROLE [flags]: the teacher role has no teacher; the students use the exported one
  local wd=$1 role=$2; shift 2
  python -m flaxdistil.main --config "configs/glue.py:$TASK,$role,$TEACHER" --workdir "$OUT/$wd" \
      "$@" >> "$OUT/$wd.log" 2>&1
}
export_() { [ -d "$OUT/${1}_hf" ] || python -m flaxdistil.export --workdir "$OUT/$1" --out "$OUT/${1}_hf"; }
STUDENTS=${STUDENTS-distill finetune${GENERAL:+ general_distill general_finetune}}
run teacher teacher && export_ teacher
for wd in $STUDENTS; do
  role=${wd#general_} flags=(--config.teacher.path="$OUT/teacher_hf")
  if [ "$wd" != "$role" ]; then
    [ -n "$GENERAL" ] || { echo "$wd needs GENERAL=<general-distilled student dir>" >&2; exit 2; }
    flags+=(--config.student.path="$GENERAL")
  fi
  run "$wd" "$role" "${flags[@]}" && export_ "$wd"
done
for wd in teacher $STUDENTS; do
  [ -f "$OUT/${wd}_check.json" ] || python scripts/glue_pipeline_check.py --task "$TASK" --tsv "$DEV" --workdir "$OUT/$wd" \
      --hf "$OUT/${wd}_hf" --json_out "$OUT/${wd}_check.json"
done
