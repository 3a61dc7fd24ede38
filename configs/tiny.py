r"""Tiny smoke config: random teacher, synthetic corpus, no files, < 1 min on CPU.

  python -m flaxdistil.main --config configs/tiny.py --workdir /tmp/tiny

Expected: 20 steps, the loss falls, checkpoints under /tmp/tiny/checkpoints,
metrics.jsonl with train and eval records. Used by the tests and CI.
"""

from configs import distilbert


def get_config():
  c = distilbert.get_config()
  c.num_train_steps = 20
  c.log_every_steps = 5
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 10
  c.teacher.path = ''
  c.teacher.random_init = True
  c.teacher.hidden_size = 32
  c.teacher.num_hidden_layers = 4
  c.teacher.num_attention_heads = 4
  c.teacher.intermediate_size = 64
  c.teacher.max_position_embeddings = 64
  c.student.num_hidden_layers = 2
  c.data.synthetic = True
  c.data.max_seq_length = 32
  c.data.global_batch_size = 16
  c.data.eval_batch_size = 16
  c.data.eval_num_sequences = 64
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 2
  c.optim.num_microbatches = 2
  c.checkpoint.async_save = False
  return c
