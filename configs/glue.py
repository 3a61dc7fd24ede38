r"""Task distillation on GLUE (TinyBERT's second stage; DistilBERT's GLUE fine-tuning).

Runs per task, same data, steps, batch and seed (variant = "TASK,ROLE[,TEACHER]"):

  # 1. fine-tune the teacher (the MLM-pretrained TEACHER, see below) on the task
  python -m flaxdistil.main --config configs/glue.py:sst2,teacher --workdir runs/glue/sst2/teacher
  python -m flaxdistil.export --workdir runs/glue/sst2/teacher --out runs/glue/sst2/teacher_hf
  # 2. distil it into a half-depth DistilBERT (layers of the *pretrained* teacher):
  #    soft cross-entropy at temperature T on the class logits + gold-label CE
  python -m flaxdistil.main --config configs/glue.py:sst2,distill --workdir runs/glue/sst2/distill
  # 3. the same student fine-tuned on the labels alone
  python -m flaxdistil.main --config configs/glue.py:sst2,finetune --workdir runs/glue/sst2/finetune
  # 2'/3'. either role from a general-distilled student (DistilBERT's pipeline) instead:
  #    --config.student.path=<exported DistilBertForMaskedLM dir>  (its shape is kept)

TEACHER (default `mini`):
  mini    ../shared/models/bert-mini-wiki-teacher, BERT 4 x 256 (weak: 14% masked accuracy);
          students 2 x 256 from layers [0, 3].
  minilm  ../shared/models/minilm-l6-mlm-wiki, pretrained MiniLM-L6-H384 + MLM head (6 x 384,
          39% masked accuracy); students 3 x 384 from layers [0, 2, 5]; SST-2 500 steps (CPU
          budget). Teacher paths default to runs/glue_minilm/TASK/teacher_hf, e.g.
          `configs/glue.py:mrpc,teacher,minilm`.

`scripts/glue_distill.sh TASK [OUT]` runs all of it (TEACHER=minilm GENERAL=<dir> for the MiniLM
rows), exports the students as `DistilBertForSequenceClassification` and checks
`pipeline("text-classification")` against the Flax students. Expected: distill >= finetune on
the dev set, both below the teacher (docs/results.md). Tasks: sst2 (accuracy), mrpc (accuracy, F1).
"""

from configs import distilbert

SHARED = '../shared'
_TASK_DIRS = {'sst2': 'SST-2', 'mrpc': 'MRPC'}
# teacher name -> MLM-pretrained BERT dir, teacher layers copied into the students, runs dir,
# SST-2 steps (MiniLM: ~3x the FLOPs per step of the 4 x 256 teacher, so 500 steps (0.24 epoch)
# to fit two shared CPU cores; MRPC keeps 400 steps = 3.5 epochs for both)
TEACHERS = {
    'mini': dict(path=f'{SHARED}/models/bert-mini-wiki-teacher', layers=(0, 3),
                 runs='runs/glue', sst2_steps=1000),
    'minilm': dict(path=f'{SHARED}/models/minilm-l6-mlm-wiki', layers=(0, 2, 5),
                   runs='runs/glue_minilm', sst2_steps=500),
}
ROLES = ('teacher', 'distill', 'finetune')


def get_config(variant: str = 'sst2,distill'):
  task, role, teacher, *rest = variant.split(',') + ['', '']
  role, teacher = role or 'distill', teacher or 'mini'
  if task not in _TASK_DIRS or role not in ROLES or teacher not in TEACHERS or any(rest):
    raise ValueError(f'variant {variant!r}: use TASK,ROLE[,TEACHER] with TASK in '
                     f'{sorted(_TASK_DIRS)}, ROLE in {"|".join(ROLES)} and TEACHER in '
                     f'{"|".join(TEACHERS)}.')
  c = distilbert.get_config()
  glue_dir = f'{SHARED}/data/glue/{_TASK_DIRS[task]}'
  t = TEACHERS[teacher]
  pretrained, layers = t['path'], t['layers']              # the MLM-pretrained teacher
  c.data.task = task
  c.data.train_files = (f'{glue_dir}/train.tsv',)
  c.data.eval_files = (f'{glue_dir}/dev.tsv',)             # GLUE dev = the reported split
  c.data.tokenizer = f'{SHARED}/models/tokenizer-bert-base-uncased'  # = both teachers' vocab
  c.data.max_seq_length = 64 if task == 'sst2' else 128    # SST-2: 99.9% of sentences fit in 64
  c.data.global_batch_size = 32
  c.data.eval_batch_size = 64
  c.optim.num_microbatches = 1
  c.optim.learning_rate = 1e-4 if role == 'teacher' else 2e-4  # smaller model, larger LR
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 1.0
  c.num_train_steps = t['sst2_steps'] if task == 'sst2' else 400  # MRPC: 3.5 epochs
  c.optim.warmup_steps = c.num_train_steps // 10
  c.log_every_steps = 50
  c.eval_every_steps = 250 if task == 'sst2' else 100
  c.checkpoint_every_steps = 100      # shared CPUs: an interruption costs <= 100 steps
  c.checkpoint.max_to_keep = 1

  c.distill.alpha_mlm = 0.0
  c.distill.alpha_cos = 0.0
  c.distill.temperature = 1.0       # TinyBERT's prediction-layer T
  if role == 'teacher':             # plain fine-tuning of the BERT teacher itself
    c.teacher.path = ''
    c.student.model_type = 'bert'
    c.student.init = 'pretrained'
    c.student.path = pretrained
    c.distill.alpha_ce = 0.0
    c.distill.alpha_task = 1.0
  else:
    c.teacher.path = f"{t['runs']}/{task}/teacher_hf"       # exported fine-tuned teacher
    c.student.init = 'pretrained'   # a BERT checkpoint: DistilBERT init from its layers
    c.student.path = pretrained     # the *pretrained* teacher, so role 'finetune' sees no task teacher
    c.student.num_hidden_layers = len(layers)
    c.student.layers = layers
    c.distill.alpha_ce = 1.0 if role == 'distill' else 0.0  # soft CE at T on class logits
    c.distill.alpha_task = 1.0      # gold labels for both students (TinyBERT uses soft only;
                                    # the hard term helps a weak teacher)
  return c
