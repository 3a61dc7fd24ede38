r"""Flax classifier vs its exported transformers model under pipeline("text-classification").

  python scripts/glue_pipeline_check.py --task sst2 --tsv ../shared/data/glue/SST-2/dev.tsv \
      --workdir runs/glue/sst2/distill --hf runs/glue/sst2/distill_hf

Runs the Flax student restored from the Orbax checkpoint in `--workdir` and
`transformers.pipeline("text-classification")` on the export in `--hf` over
every example of the TSV, and prints how many predicted labels agree, each
side's accuracy (and F1 of label 1) against the gold labels, and the largest
difference of the top-label probability. Exit code 1 if any label differs.
"""

import argparse
import json
import sys

import jax
import numpy as np

from flaxdistil.data import glue
from flaxdistil.data import tokenization
from flaxdistil.model import bert
from flaxdistil.training import checkpointing


def flax_probs(workdir: str, tokenizer, texts_a, texts_b, batch_size: int = 128):
  """`[N, num_labels]` float32 softmax probabilities of the Flax model in `workdir`."""
  cfg, params, meta, _ = checkpointing.load_student(workdir)
  seq_len = meta['fingerprint']['max_seq_length']
  enc = glue.encode(tokenizer, texts_a, texts_b, seq_len)
  model = bert.MaskedLM(cfg)
  fn = jax.jit(lambda p, b: jax.nn.softmax(model.apply(
      {'params': p}, b['input_ids'], b['attention_mask'], b['token_type_ids']).class_logits))
  batches = glue.eval_batches(dict(enc, labels=np.zeros(len(texts_a), np.int32)), batch_size)
  out = np.concatenate([np.asarray(fn(params, b)) for b in batches])
  return out[:len(texts_a)], seq_len


def pipeline_predictions(hf_dir: str, texts_a, texts_b, max_length: int, batch_size: int = 64):
  """(label names, top-label probabilities) from `pipeline("text-classification")`."""
  import transformers  # pylint: disable=g-import-not-at-top
  clf = transformers.pipeline('text-classification', model=hf_dir, tokenizer=hf_dir, device=-1)
  inputs = (list(texts_a) if texts_b is None else
            [{'text': a, 'text_pair': b} for a, b in zip(texts_a, texts_b)])
  out = clf(inputs, batch_size=batch_size, truncation=True, max_length=max_length)
  return [o['label'] for o in out], np.asarray([o['score'] for o in out], np.float32)


def scores(pred_ids: np.ndarray, labels: np.ndarray) -> dict:
  tp = float(np.sum((pred_ids == 1) & (labels == 1)))
  fp = float(np.sum((pred_ids == 1) & (labels != 1)))
  fn = float(np.sum((pred_ids != 1) & (labels == 1)))
  return {'accuracy': float(np.mean(pred_ids == labels)), 'f1': glue.f1_from_counts(tp, fp, fn)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--task', required=True, choices=sorted(glue.TASKS))
  ap.add_argument('--tsv', required=True, help='labelled GLUE TSV (dev.tsv)')
  ap.add_argument('--workdir', required=True, help='training workdir (Orbax checkpoints)')
  ap.add_argument('--hf', required=True, help='exported transformers directory')
  ap.add_argument('--json_out', default='')
  args = ap.parse_args()

  task = glue.get_task(args.task)
  texts_a, texts_b, labels = glue.read_tsv(args.tsv, task)
  tokenizer = tokenization.load_tokenizer(args.hf)
  probs, seq_len = flax_probs(args.workdir, tokenizer, texts_a, texts_b)
  flax_ids = probs.argmax(-1)
  hf_labels, hf_scores = pipeline_predictions(args.hf, texts_a, texts_b, seq_len)
  name_to_id = {n: i for i, n in enumerate(task.label_names)}
  hf_ids = np.asarray([name_to_id[n] for n in hf_labels])
  report = {
      'task': task.name, 'workdir': args.workdir, 'hf': args.hf, 'num_examples': len(labels),
      'labels_equal': int(np.sum(hf_ids == flax_ids)),
      'max_abs_diff_top_prob': float(np.max(np.abs(probs.max(-1) - hf_scores))),
      'flax': scores(flax_ids, labels), 'pipeline': scores(hf_ids, labels),
  }
  print(json.dumps(report, indent=1))
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(report, f, indent=1)
  sys.exit(0 if report['labels_equal'] == len(labels) else 1)


if __name__ == '__main__':
  main()
