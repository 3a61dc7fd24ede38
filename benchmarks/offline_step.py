r"""Student step throughput: cached teacher targets (offline) vs the online teacher forward.

Same shapes and step as `distill_step.py` (bert-base-shaped random teacher 12 x 768, vocab 30522
-> 6-layer DistilBERT student, seq 128, the DistilBERT recipe's loss: T=2, alpha_ce=5,
alpha_mlm=2, alpha_cos=1, KL over every non-padding token), timed three ways with the project's
real `train_step.make_train_step` (`benchmarks/common.py`):
  online    teacher forward + student forward/backward + AdamW (today's step)
  offline k the teacher's top-k logits (bfloat16) + ids (int32) + logsumexp over the vocabulary
            (float32, for the recipe's tail bucket) + last hidden state (bfloat16) come with the
            batch (random tensors of the shapes `teacher.cache` serves); sparse KL
Expected gain ~ 1 / (1 - teacher-forward share of the step's FLOPs), printed as well. Host-side
reading of a real cache is excluded (it runs in the prefetch thread, overlapped with the step).

  # idle machine, CPU (a few minutes):
  python benchmarks/offline_step.py --batch_size 4 --steps 3 --warmup 1 --top_k 8,64
  # GPU:
  python benchmarks/offline_step.py --batch_size 64 --dtype bfloat16 --steps 20 --warmup 3
  # smoke test (seconds):
  python benchmarks/offline_step.py --hidden_size 64 --vocab_size 512 --teacher_layers 2 \
      --student_layers 1 --batch_size 8 --seq_len 32 --steps 2 --warmup 1
"""

import argparse
import os
import time
import traceback

import common  # the sibling module: this file's directory is sys.path[0]
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np

from configs import distilbert as distilbert_config
from flaxdistil.storage import atomic


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  for name, default in (('batch_size', 32), ('seq_len', 128), ('teacher_layers', 12),
                        ('student_layers', 6), ('vocab_size', 30522), ('hidden_size', 768),
                        ('steps', 10), ('warmup', 2)):
    p.add_argument(f'--{name}', type=int, default=default)
  p.add_argument('--top_k', default='8,64', help='comma-separated k of the offline steps')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  p.add_argument('--json_out', default='')
  return p.parse_args(argv)


def _time_step(bench, objective, state, teacher_params, batch, a) -> dict:
  """Compiles the step, runs `a.warmup` steps, then times `a.steps` (one window)."""
  compiled, compile_s = bench.compile(objective, 1, state, teacher_params, batch)
  for _ in range(a.warmup):
    state, m = compiled(state, teacher_params, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(a.steps):
    state, m = compiled(state, teacher_params, batch)
  jax.block_until_ready((state, m))
  step_s = (time.perf_counter() - t0) / a.steps
  return {'step_time_s': step_s, 'tokens_per_s': a.batch_size * a.seq_len / step_s,
          'compile_s': compile_s, 'loss': float(m['loss'])}


def main(argv=None):
  a = parse_args(argv)
  bench = common.step_setup(a)
  dense = dict(vocab_chunk_size=0, max_predictions_per_seq=0)  # the sparse KL needs full logits
  host = common.make_batch(a)
  flops = common.model_flops(a)
  share = flops['teacher_fwd_flops'] / flops['flops_per_step']
  print(f'devices: {jax.local_device_count()} x {jax.local_devices()[0].device_kind}; batch '
        f'{a.batch_size} x {a.seq_len}, {a.dtype}, teacher {a.teacher_layers}x{a.hidden_size} -> '
        f'student {a.student_layers}x{a.hidden_size}, vocab {a.vocab_size}', flush=True)

  results = {}

  def publish(complete=False):  # rewritten after every step, so a killed run keeps what it timed
    online = results.get('online', {})
    for r in results.values():
      if 'tokens_per_s' in r and 'tokens_per_s' in online:
        r['vs_online'] = r['tokens_per_s'] / online['tokens_per_s']
    if a.json_out:
      atomic.write_json(a.json_out, {
          'args': vars(a), 'flops': flops, 'teacher_share': share, 'results': results,
          'device_kind': jax.local_devices()[0].device_kind, 'platform': jax.default_backend(),
          'jax_version': jax.__version__, 'complete': complete})

  def timed(name, make):
    try:
      results[name] = {'status': 'ok', **_time_step(bench, *make(), a)}
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: the rest run)
      traceback.print_exc()
      results[name] = {'status': 'failed', 'error': f'{type(e).__name__}: {e}'[:2000]}
    publish()

  print('timing online (teacher forward in the step) ...', flush=True)
  timed('online', lambda: (common.recipe_objective(**dense), bench.fresh_state(),
                           bench.teacher_params(), bench.global_batch(host, a.batch_size)))
  rng = np.random.default_rng(0)
  for k in [int(x) for x in a.top_k.split(',')]:
    print(f'timing offline k={k} (cached targets in the batch) ...', flush=True)
    shape = (a.batch_size, a.seq_len, k)
    values = np.sort(rng.normal(size=shape), -1)[..., ::-1]
    temp = distilbert_config.get_config().distill.temperature
    # log sum over V of exp(t / T): the top-k's, plus as much again for the tail (tail mass 1/2)
    logz = np.log(2.0) + np.log(np.exp(values / temp).sum(-1))
    cached = dict(host, teacher_topk_values=values.astype(jnp.bfloat16),
                  teacher_topk_ids=rng.integers(0, a.vocab_size, shape, dtype=np.int32),
                  teacher_logz=logz.astype(np.float32),
                  teacher_hidden=rng.normal(size=(a.batch_size, a.seq_len, a.hidden_size)).astype(
                      jnp.bfloat16))
    timed(f'offline_k{k}', lambda: (common.recipe_objective(offline=True, **dense),
                                    bench.fresh_state(), None,
                                    bench.global_batch(cached, a.batch_size)))

  print('\n| step | step time (ms) | tokens/s | vs online |\n|---|---|---|---|')
  for name, r in results.items():
    if r['status'] != 'ok':
      print(f"| {name} | failed: {r['error'][:200]} | | |")
      continue
    vs = f"{r['vs_online']:.2f}x" if 'vs_online' in r else '-'
    print(f"| {name} | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {vs} |")
  print(f'\nteacher-forward share of model FLOPs: {100 * share:.1f}% -> expected offline gain '
        f'~{1 / (1 - share):.2f}x (the sparse KL and the batch transfer are extra); host load '
        f'average {os.getloadavg()[0]:.1f}')
  publish(complete=True)
  if a.json_out:
    print(f'wrote {a.json_out}')


if __name__ == '__main__':
  main()
