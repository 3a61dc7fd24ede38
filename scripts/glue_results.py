"""Prints the GLUE tables from `scripts/glue_distill.sh` outputs: quality, retention, speed.

  python scripts/glue_results.py runs/glue/sst2 runs/glue/mrpc
  python scripts/glue_results.py --inference runs/glue_minilm/inference_cpu.json \
      runs/glue_minilm/sst2 runs/glue_minilm/mrpc

Per task directory, every role that ran (`teacher`, `general_distill`, `general_finetune`,
`distill`, `finetune`): the dev metrics of its `summary.json`, each student's accuracy and F1 as
a percentage of the fine-tuned teacher's (DistilBERT's "97% retained", TinyBERT's "96%"), the
model's shape (its export's config.json), steps, and the pipeline("text-classification") check
of the export (`<role>_check.json`: labels equal to the Flax model's). With `--inference`
(`benchmarks/inference.py --json_out` over some `<role>_hf` dirs): one more table with size,
CPU latency / throughput (ONNX fp32 and int8) and speedup against the teacher beside the
retained quality of each role on every task.
"""

import argparse
import json
import os

ROLES = (
    ('teacher', 'teacher, fine-tuned'),
    ('general_distill', 'general-distilled student + task distillation (TinyBERT\'s 2 stages)'),
    ('general_finetune', 'general-distilled student, fine-tuned (DistilBERT\'s pipeline)'),
    ('distill', 'student from teacher layers, task distillation only'),
    ('finetune', 'student from teacher layers, fine-tuned without teacher'),
)


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def shape(hf_config: dict | None) -> str:
  """'L × H' of an exported BERT / DistilBERT config.json, '?' if there is none."""
  if not hf_config:
    return '?'
  layers = hf_config.get('num_hidden_layers', hf_config.get('n_layers'))
  hidden = hf_config.get('hidden_size', hf_config.get('dim'))
  return f'{layers} × {hidden}'


def retention(student: float, teacher: float) -> float:
  """`student` as a percentage of `teacher` (the seed papers' 'retained' figure)."""
  return 100.0 * student / teacher


def task_rows(task_dir: str) -> list[dict]:
  """One dict per role that has a summary.json: role, name, shape, acc, f1, agreement, steps,
  pipe (labels equal / examples or None), ret_acc / ret_f1 (% of the teacher's, None for the
  teacher or without one)."""
  rows, teacher = [], None
  for role, name in ROLES:
    s = _load(os.path.join(task_dir, role, 'summary.json'))
    if s is None:
      continue
    st, chk = s['student'], _load(os.path.join(task_dir, f'{role}_check.json'))
    row = {'role': role, 'name': name, 'shape': shape(_load(os.path.join(
        task_dir, f'{role}_hf', 'config.json'))), 'acc': st['accuracy'], 'f1': st.get('f1'),
           'agreement': st.get('agreement'), 'steps': s['step'],
           'pipe': None if chk is None else (chk['labels_equal'], chk['num_examples'])}
    if role == 'teacher':
      teacher = row
    row['ret_acc'] = None if teacher is None or row is teacher else retention(
        row['acc'], teacher['acc'])
    row['ret_f1'] = None if teacher is None or row is teacher or row['f1'] is None else (
        retention(row['f1'], teacher['f1']))
    rows.append(row)
  return rows


def _pct(x):
  return '-' if x is None else f'{x:.1f}%'


def quality_table(task_dirs) -> str:
  out = ['| task | model | layers × hidden | dev acc | dev F1 | acc % of teacher | '
         'F1 % of teacher | agreement w/ teacher | steps | pipeline labels = Flax |',
         '|---|---|---|---|---|---|---|---|---|---|']
  for d in task_dirs:
    task = os.path.basename(d.rstrip('/'))
    for r in task_rows(d):
      agree = '-' if r['agreement'] is None else f"{r['agreement']:.3f}"
      pipe = '-' if r['pipe'] is None else f"{r['pipe'][0]}/{r['pipe'][1]}"
      f1 = '-' if r['f1'] is None else f"{r['f1']:.4f}"
      out.append(f"| {task} | {r['name']} | {r['shape']} | {r['acc']:.4f} | {f1} | "
                 f"{_pct(r['ret_acc'])} | {_pct(r['ret_f1'])} | {agree} | {r['steps']} | {pipe} |")
  return '\n'.join(out)


def speed_table(task_dirs, inference: dict) -> str:
  """Size, speed and retained quality per role; speed rows are matched to `<task>/<role>_hf`."""
  by_path = {os.path.realpath(r['path']): r for r in inference['rows']}
  speed, quality = {}, {}
  for d in task_dirs:
    task = os.path.basename(d.rstrip('/'))
    for r in task_rows(d):
      quality.setdefault(r['role'], {})[task] = r
      bench = by_path.get(os.path.realpath(os.path.join(d, f"{r['role']}_hf")))
      if bench is not None:
        speed.setdefault(r['role'], bench)
  if 'teacher' not in speed:
    raise ValueError('--inference has no row for any task\'s teacher_hf: benchmark it too '
                     '(the speedups are against it).')
  ref = speed['teacher']
  b = inference['args']['batch_size']
  tasks = [os.path.basename(d.rstrip('/')) for d in task_dirs]
  out = [f"seq {inference['args']['seq_len']}, {inference['args']['threads']} threads, load average "
         f"{inference['loadavg_before'][0]:.2f} before / {inference['loadavg_after'][0]:.2f} after; "
         f'latency batch 1 (p50 ms), throughput batch {b} (sequences/s); speedup = teacher p50 / '
         'model p50 (ONNX fp32 / int8)', '',
         f'| model | params (M) | ORT fp32 b=1 ms | ORT int8 b=1 ms | ORT fp32 b={b} seq/s | '
         f'ORT int8 b={b} seq/s | b=1 speedup fp32 / int8 | '
         + ' | '.join(f'{t} acc (F1) % of teacher' for t in tasks) + ' |',
         '|---|---|---|---|---|---|---|' + '---|' * len(tasks)]
  for role, name in ROLES:
    if role not in speed:
      continue
    s = speed[role]
    fp32, int8 = s['onnxruntime'], s['onnxruntime_int8']
    cells = []
    for t in tasks:
      q = quality.get(role, {}).get(t)
      if q is None:
        cells.append('-')
      elif role == 'teacher':
        cells.append(f"100% ({q['acc']:.3f})")
      else:
        cells.append(_pct(q['ret_acc']) + ('' if q['ret_f1'] is None else f" ({_pct(q['ret_f1'])})"))
    out.append(f"| {name} | {s['params'] / 1e6:.1f} | {fp32['p50_ms']:.1f} | {int8['p50_ms']:.1f} | "
               f"{fp32['seq_per_s']:.1f} | {int8['seq_per_s']:.1f} | "
               f"{ref['onnxruntime']['p50_ms'] / fp32['p50_ms']:.2f}x / "
               f"{ref['onnxruntime']['p50_ms'] / int8['p50_ms']:.2f}x | " + ' | '.join(cells) + ' |')
  return '\n'.join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('task_dirs', nargs='+', help='scripts/glue_distill.sh OUT/TASK directories')
  ap.add_argument('--inference', default='', help='benchmarks/inference.py --json_out file')
  args = ap.parse_args(argv)
  print(quality_table(args.task_dirs))
  if args.inference:
    print()
    print(speed_table(args.task_dirs, _load(args.inference)))


if __name__ == '__main__':
  main()
