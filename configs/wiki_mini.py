r"""Real run here: bert-mini-wiki-teacher (4 x 256) -> 2-layer student on Wikipedia.

Paths point into ../shared (relative to the repo root); override them on other
machines. The three students of README's results table:

  # (a) teacher init + triple loss
  python -m flaxdistil.main --config configs/wiki_mini.py --workdir runs/a_distil
  # (b) teacher init, MLM only
  python -m flaxdistil.main --config configs/wiki_mini.py --workdir runs/b_mlm_init \
      --config.distill.alpha_ce=0 --config.distill.alpha_cos=0
  # (c) random init, MLM only
  python -m flaxdistil.main --config configs/wiki_mini.py --workdir runs/c_mlm_random \
      --config.distill.alpha_ce=0 --config.distill.alpha_cos=0 --config.student.init=random

Expected: (a) beats (b) and (c) in held-out masked-token accuracy (README table).
"""

from configs import distilbert

SHARED = '../shared'


def get_config():
  c = distilbert.get_config()
  c.num_train_steps = 600
  c.log_every_steps = 50
  c.eval_every_steps = 300
  c.checkpoint_every_steps = 100
  c.teacher.path = f'{SHARED}/models/bert-mini-wiki-teacher'
  c.data.tokenizer = f'{SHARED}/models/tokenizer-bert-base-uncased'
  c.data.train_files = (f'{SHARED}/data/wikipedia-en-2018/train.txt',)
  c.data.eval_files = (f'{SHARED}/data/wikipedia-en-2018/valid.txt',)
  c.student.num_hidden_layers = 2   # half the teacher's 4: layers [0, 3]
  c.data.max_seq_length = 128
  c.data.global_batch_size = 32    # 4096 tokens/step: ~1.6 s/step on 2 CPU cores
  c.data.eval_num_sequences = 512   # as the teacher's README: first 512 packed valid sequences
  c.optim.num_microbatches = 1
  # CPU budget: MLM heads (student and teacher) only on masked positions, so the
  # KL term is restricted to masked tokens (HF distiller's restrict_ce_to_mask).
  c.distill.restrict_ce_to_mask = True
  c.distill.max_predictions_per_seq = 40  # 15% of 128 = 19 on average
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 60
  return c
