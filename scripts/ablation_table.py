r"""DistilBERT's ablation table (Sanh et al., 2019, Table 4) from `scripts/evaluate.py --json_out`.

  python scripts/ablation_table.py --json valid=runs/abl/valid.json --json test=runs/abl/test.json

Each JSON holds the teacher and the students scored on one held-out set with one masking; the
first student is the reference row (a) (triple loss + teacher init). Every other row is labelled
by what its workdir's `config.json` changes against (a) (an alpha set to 0, or `student.init`),
and put beside the paper's GLUE macro-score delta for that change. Then, for every pair of rows
the paper orders, whether the measured masked-token accuracy orders them the same way, and by
how many paired standard errors (`evaluate.py`'s per-token differences over the same tokens).
"""

import argparse
import json
import math
import os

# DistilBERT, Table 4: GLUE macro-score of each variant minus the triple-loss, teacher-init model.
PAPER_TABLE4 = {
    'random init': -3.69,
    'without L_ce': -2.96,
    'without L_cos': -1.46,
    'without L_mlm': -0.31,
}
_ALPHAS = (('alpha_ce', 'L_ce'), ('alpha_cos', 'L_cos'), ('alpha_mlm', 'L_mlm'))


# config fields that do not change what a run learns (logging, checkpoints, caches)
_IRRELEVANT = {'steps_per_run', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'data.cache_dir', 'data.num_proc', 'checkpoint.max_to_keep', 'checkpoint.async_save'}
REFERENCE = 'triple loss + teacher init'


def _flat(config: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def change_label(config: dict, reference: dict) -> str:
  """What `config` (a workdir's config.json) changes against `reference`, in Table 4's terms.

  Returns REFERENCE for no change, else e.g. 'without L_ce', 'random init', 'alpha_ce=2.0', or
  several joined by ' + '.

  Raises:
    ValueError: the two differ in more than the three alphas and `student.init` that Table 4
      varies (anything else would make the rows incomparable), naming the fields.
  """
  a, b = _flat(config), _flat(reference)
  differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in _IRRELEVANT)
  changes = []
  for name, term in _ALPHAS:
    key = f'distill.{name}'
    if key in differ:
      differ.remove(key)
      changes.append(f'without {term}' if a[key] == 0 else f'{name}={a[key]}')
  if 'student.init' in differ:
    differ.remove('student.init')
    changes.append(f'{a["student.init"]} init')
  if differ:
    raise ValueError(f'rows differ in more than Table 4 varies: {", ".join(differ)}; give runs '
                     'that share everything else (scripts/minilm_ablation.sh).')
  return ' + '.join(changes) or REFERENCE


def orderings(paired: dict) -> list[dict]:
  """Pairwise check of the paper's ordering against measured accuracy differences.

  Args:
    paired: `(label, other label) -> (accuracy difference label - other, paired s.e.)`, fractions,
      over the same masked tokens (`evaluate.py`'s `paired_acc`), for every measured pair.

  Returns one dict per pair (worse, better) the paper orders (`PAPER_TABLE4`, REFERENCE at 0),
  both measured: `worse`, `better`, `paper_gap` (GLUE points, better - worse), `measured_gap`
  (accuracy, better - worse), `z` (measured_gap / its paired s.e.) and `verdict`: 'yes' (z >= 2),
  'no' (z <= -2: reversed) or 'tie' (|z| < 2: the measurement cannot order them).
  """
  paper = dict(PAPER_TABLE4, **{REFERENCE: 0.0})
  labels = {k for pair in paired for k in pair}
  rows = sorted((k for k in paper if k in labels), key=lambda k: paper[k])
  out = []
  for i, worse in enumerate(rows):
    for better in rows[i + 1:]:
      if (better, worse) not in paired:
        continue
      gap, se = paired[(better, worse)]
      z = gap / se if se else (math.copysign(math.inf, gap) if gap else 0.0)
      out.append({'worse': worse, 'better': better, 'paper_gap': paper[better] - paper[worse],
                  'measured_gap': gap, 'z': z,
                  'verdict': 'yes' if z >= 2 else ('no' if z <= -2 else 'tie')})
  return out


def _load(path):
  with open(path) as f:
    return json.load(f)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--json', action='append', required=True, metavar='NAME=PATH',
                  help='evaluate.py --json_out file, e.g. valid=valid.json (repeatable)')
  args = ap.parse_args(argv)
  sets = [tuple(s.split('=', 1)) for s in args.json]
  evals = {name: _load(path) for name, path in sets}
  first = evals[sets[0][0]]['models']
  students = [n for n in first if n != 'teacher']
  configs = {n: _load(os.path.join(first[n]['workdir'], 'config.json')) for n in students}
  labels = {n: change_label(configs[n], configs[students[0]]) for n in students}
  head = ' | '.join(f'{s} acc (± s.e.) | {s} ppl | {s} agree' for s, _ in sets)
  print(f'| row | model | {head} | Δ acc vs (a), {sets[-1][0]} (paired s.e.) | '
        'paper Δ GLUE vs (a) |')
  print('|---|---|' + '---|---|---|' * len(sets) + '---|---|')
  for i, n in enumerate(['teacher'] + students):
    cells = []
    for s, _ in sets:
      m = evals[s]['models'][n]
      agree = f"{m['agreement']:.3f}" if 'agreement' in m else '-'
      cells.append(f"{m['accuracy']:.4f} ± {m['se']:.4f} | {m['perplexity']:.1f} | {agree}")
    last = evals[sets[-1][0]]['models'][n]
    diff = (f"{last['acc_diff'] * 100:+.2f} ± {last['acc_diff_se'] * 100:.2f} pts"
            if 'acc_diff' in last else ('0' if i == 1 else '-'))
    label = 'teacher' if n == 'teacher' else labels[n]
    paper = 0.0 if label == REFERENCE else PAPER_TABLE4.get(label)
    row = '-' if i == 0 else f'({chr(96 + i)})'
    print(f"| {row} | {label} ({n}) | {' | '.join(cells)} | {diff} | "
          f"{'-' if paper is None else f'{paper:+.2f}'} |")
  for s, _ in sets:
    models = evals[s]['models']
    pairs = orderings({(labels[n], labels[o]): (d['diff'], d['se'])
                       for n in students for o, d in models[n].get('paired_acc', {}).items()})
    count = lambda v: sum(p['verdict'] == v for p in pairs)
    print(f'\n{s}: the paper\'s orderings by masked-token accuracy: {count("yes")} of {len(pairs)} '
          f'pairs replicate (>= 2 paired s.e.), {count("tie")} tie, {count("no")} reversed:\n')
    print('| worse (paper) | better (paper) | paper gap (GLUE pts) | measured gap (acc pts) | '
          'gap / paired s.e. | replicates |')
    print('|---|---|---|---|---|---|')
    for p in pairs:
      print(f"| {p['worse']} | {p['better']} | {p['paper_gap']:+.2f} | "
            f"{p['measured_gap'] * 100:+.2f} | {p['z']:+.1f} | "
            f"{p['verdict']} |")


if __name__ == '__main__':
  main()
