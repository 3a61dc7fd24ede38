r"""Task distillation on GLUE (TinyBERT's second stage; DistilBERT's GLUE fine-tuning).

Three runs per task, same data, steps, batch and seed (variant = "TASK,ROLE"):

  # 1. fine-tune the teacher (the pretrained bert-mini-wiki-teacher, 4 x 256) on the task
  python -m flaxdistil.main --config configs/glue.py:sst2,teacher --workdir runs/glue/sst2/teacher
  python -m flaxdistil.export --workdir runs/glue/sst2/teacher --out runs/glue/sst2/teacher_hf
  # 2. distil it into a 2-layer DistilBERT (layers [0, 3] of the pretrained teacher):
  #    soft cross-entropy at temperature T on the class logits + gold-label CE
  python -m flaxdistil.main --config configs/glue.py:sst2,distill --workdir runs/glue/sst2/distill
  # 3. the same student fine-tuned on the labels alone
  python -m flaxdistil.main --config configs/glue.py:sst2,finetune --workdir runs/glue/sst2/finetune

`scripts/glue_distill.sh TASK` runs all of it, exports the students as
`DistilBertForSequenceClassification` and checks `pipeline("text-classification")`
against the Flax students. Expected: distill >= finetune on the dev set, both
below the teacher (README table). Tasks: sst2 (accuracy), mrpc (accuracy, F1).
"""

from configs import distilbert

SHARED = '../shared'
_TASK_DIRS = {'sst2': 'SST-2', 'mrpc': 'MRPC'}


def get_config(variant: str = 'sst2,distill'):
  task, _, role = variant.partition(',')
  role = role or 'distill'
  if task not in _TASK_DIRS or role not in ('teacher', 'distill', 'finetune'):
    raise ValueError(f'variant {variant!r}: use TASK,ROLE with TASK in {sorted(_TASK_DIRS)} and '
                     'ROLE in teacher|distill|finetune.')
  c = distilbert.get_config()
  glue_dir = f'{SHARED}/data/glue/{_TASK_DIRS[task]}'
  pretrained = f'{SHARED}/models/bert-mini-wiki-teacher'   # the MLM-pretrained teacher
  c.data.task = task
  c.data.train_files = (f'{glue_dir}/train.tsv',)
  c.data.eval_files = (f'{glue_dir}/dev.tsv',)             # GLUE dev = the reported split
  c.data.tokenizer = f'{SHARED}/models/tokenizer-bert-base-uncased'
  c.data.max_seq_length = 64 if task == 'sst2' else 128    # SST-2: 99.9% of sentences fit in 64
  c.data.global_batch_size = 32
  c.data.eval_batch_size = 64
  c.optim.num_microbatches = 1
  c.optim.learning_rate = 1e-4 if role == 'teacher' else 2e-4  # smaller model, larger LR
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 1.0
  c.num_train_steps = 1000 if task == 'sst2' else 400      # SST-2: 0.5 epoch; MRPC: 3.5 epochs
  c.optim.warmup_steps = c.num_train_steps // 10
  c.log_every_steps = 50
  c.eval_every_steps = 250 if task == 'sst2' else 100
  c.checkpoint_every_steps = 250
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
    c.teacher.path = f'runs/glue/{task}/teacher_hf'         # exported fine-tuned teacher
    c.student.init = 'pretrained'   # a BERT checkpoint: DistilBERT init from its layers
    c.student.path = pretrained     # the *pretrained* teacher, so role 'finetune' sees no task teacher
    c.student.num_hidden_layers = 2
    c.student.layers = (0, 3)
    c.distill.alpha_ce = 1.0 if role == 'distill' else 0.0  # soft CE at T on class logits
    c.distill.alpha_task = 1.0      # gold labels for both students (TinyBERT uses soft only;
                                    # the hard term helps a weak teacher)
  return c
