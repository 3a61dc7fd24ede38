"""fill-mask with an exported student (transformers) next to the Flax student it came from.

  python -m flaxdistil.export --workdir runs/wiki_ablation/a_distil --out exported/a_distil
  python scripts/fill_mask_demo.py --workdir runs/wiki_ablation/a_distil --hf exported/a_distil

Prints, per sentence, the top-5 tokens of `pipeline("fill-mask")` and whether the Flax
student's top-5 (restored from the same checkpoint) is identical.
"""

import argparse

from flaxdistil.training import checkpointing

SENTENCES = (
    'The capital of France is [MASK].',
    'He was born in London and studied at the [MASK] of Oxford.',
    'The river flows into the [MASK] Ocean.',
    'She played for the national football [MASK] from 2005 to 2010.',
    'The album was released in [MASK] 2017.',
)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--hf', required=True)
  args = ap.parse_args()
  import jax.numpy as jnp
  import numpy as np
  import transformers

  from flaxdistil.model import bert

  fill = transformers.pipeline('fill-mask', model=args.hf, top_k=5, device='cpu')
  scfg, params, _, step = checkpointing.load_student(args.workdir)
  tok = fill.tokenizer
  print(f'student step {step}; transformers {type(fill.model).__name__} from {args.hf}')
  for text in SENTENCES:
    preds = fill(text)
    enc = tok(text, return_tensors='np')
    logits = bert.MaskedLM(scfg).apply({'params': params}, jnp.asarray(enc['input_ids']),
                                         jnp.asarray(enc['attention_mask'])).logits
    pos = int(np.where(enc['input_ids'][0] == tok.mask_token_id)[0][0])
    flax_top5 = [int(i) for i in np.argsort(-np.asarray(logits[0, pos]))[:5]]
    same = flax_top5 == [p['token'] for p in preds]
    print(f'{text}\n  -> ' + ', '.join(f"{p['token_str']} ({p['score']:.3f})" for p in preds) +
          f'   [Flax top-5 identical: {same}]')


if __name__ == '__main__':
  main()
