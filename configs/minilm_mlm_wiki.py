r"""DistilBERT's ablation with a teacher worth distilling: minilm-l6-mlm-wiki -> 3 x 384.

The teacher is `../shared/models/minilm-l6-mlm-wiki`: the pretrained MiniLM-L6-H384 encoder
(6 x 384, 12 heads) with an MLM head fitted on this Wikipedia text (39.2% held-out masked-token
accuracy, perplexity 51; its README). The student is DistilBERT 3 x 384 initialised from teacher
layers [0, 2, 5] (= the project's round(linspace) rule for 6 -> 3, which keeps the first and last
layer as HF's extract_distilbert.py does). Every row has the same 300 steps x 32 x 128 tokens
(1.2 M; wiki_mini's 600 would not fit five rows on two shared CPU cores), seed, data order and
masking (Sanh et al., 2019, Table 4; variant = row):

  R=runs/minilm_ablation; C=--config.data.cache_dir=$R/data_cache
  python -m flaxdistil.main --config configs/minilm_mlm_wiki.py     --workdir $R/a $C  # triple loss
  python -m flaxdistil.main --config configs/minilm_mlm_wiki.py:no_ce  --workdir $R/b_no_ce $C
  python -m flaxdistil.main --config configs/minilm_mlm_wiki.py:no_cos --workdir $R/c_no_cos $C
  python -m flaxdistil.main --config configs/minilm_mlm_wiki.py:no_mlm --workdir $R/d_no_mlm $C
  python -m flaxdistil.main --config configs/minilm_mlm_wiki.py:random --workdir $R/e_random $C

(`scripts/minilm_ablation.sh` runs all five and the tables.) Expected, from the paper's GLUE
deltas vs (a) (random init -3.69, no L_ce -2.96, no L_cos -1.46, no L_mlm -0.31): (a) best,
(e) far behind; measured here on held-out masked-token accuracy / perplexity / agreement with
the teacher (docs/results.md).
"""

from configs import wiki_mini

SHARED = '../shared'
TEACHER = f'{SHARED}/models/minilm-l6-mlm-wiki'
# variant -> the one change against row (a) (the paper's Table 4 rows)
VARIANTS = {
    '': {},                                    # (a) triple loss + teacher init
    'no_ce': {'alpha_ce': 0.0},                # (b) without L_ce
    'no_cos': {'alpha_cos': 0.0},              # (c) without L_cos
    'no_mlm': {'alpha_mlm': 0.0},              # (d) without L_mlm
    'random': {'init': 'random'},              # (e) random init, triple loss
}


def get_config(variant: str = ''):
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; use one of {sorted(VARIANTS)} '
                     '("" = triple loss + teacher init).')
  # wiki_mini: Wikipedia train/valid, batch 32 x 128, 600 steps, AdamW 5e-4 (60 warmup),
  # T=2, alpha_ce=5, alpha_mlm=2, alpha_cos=1, MLM heads on <= 40 masked positions per sequence
  # (KL over masked tokens; the CPU budget), eval on the first 512 valid sequences.
  c = wiki_mini.get_config()
  c.teacher.path = TEACHER
  c.data.tokenizer = ''              # the teacher's own (bert-base-uncased's vocabulary)
  c.student.num_hidden_layers = 3    # half the teacher's 6
  c.student.layers = (0, 2, 5)       # teacher layers copied into the student (init='teacher')
  c.num_train_steps = 300            # 1.2 M tokens: five rows fit the CPU budget (~1 h each idle)
  c.optim.warmup_steps = 30          # 10%, as wiki_mini's 60 of 600
  c.eval_every_steps = 150
  c.checkpoint_every_steps = 50      # a shared CPU: an interruption costs <= 50 steps
  for key, value in VARIANTS[variant].items():
    if key == 'init':
      c.student.init = value
    else:
      c.distill[key] = value
  return c
