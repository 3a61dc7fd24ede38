r"""Attention cores of `bert.MaskedLM` against each other: values, gradients and forward time.

`ModelConfig.attention_implementation` (config key `attention_implementation`) picks the
`jax.nn.dot_product_attention` implementation wherever no attention probabilities or attention
dropout are needed (the teacher forward, evaluation); the explicit einsum/softmax path is the
reference (`output_attentions=True` forces it). For a random bert-base-wide model and a batch
with right-padded, left-padded and holed attention masks, this prints and stores, per
implementation (explicit, default = jax's None, xla, and cudnn where an NVIDIA GPU and bf16/fp16
allow it):
  * max |logits - explicit| and max |last hidden - explicit| over real tokens, and relative to
    max |explicit| (the parity the unit tests assert on CPU in float32, here in the run's dtype),
  * the same for the parameter gradients of a scalar of the logits (deterministic, so every
    implementation's backward pass is used),
  * forward time (jitted, min of `--repeats` windows of `--steps` calls) and tokens/s.

  # GPU (part of benchmarks/gpu_suite.py):
  python benchmarks/attention_parity.py --dtype bfloat16 --json_out /tmp/attention.json
  # CPU, small (explicit vs XLA; cudnn reported as skipped):
  python benchmarks/attention_parity.py --hidden_size 64 --num_hidden_layers 2 --vocab_size 512 \
      --batch_size 4 --seq_len 32 --steps 2
"""

import argparse
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from flaxdistil.model import bert
from flaxdistil.storage import atomic

# Relative max |difference| accepted as "the same function" per compute dtype.
TOLERANCE = {'float32': 1e-4, 'bfloat16': 3e-2, 'float16': 3e-3}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  for name, default in (('hidden_size', 768), ('num_hidden_layers', 4), ('vocab_size', 30522),
                        ('batch_size', 64), ('seq_len', 128), ('steps', 10), ('repeats', 3)):
    p.add_argument(f'--{name}', type=int, default=default)
  p.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default='bfloat16')
  p.add_argument('--json_out', default='')
  return p.parse_args(argv)


def make_inputs(a):
  """`[B, T]` int32 ids and masks: full rows, right-padded rows, a left-padded row, a holed row."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1000 % a.vocab_size, a.vocab_size, (a.batch_size, a.seq_len), dtype=np.int32)
  mask = np.ones_like(ids)
  for i in range(1, a.batch_size, 2):  # every other row right-padded to a different length
    mask[i, max(1, a.seq_len - i * a.seq_len // (2 * a.batch_size) - 1):] = 0
  mask[0, : a.seq_len // 4] = 0  # left padding
  if a.batch_size > 2:
    mask[2, a.seq_len // 3: a.seq_len // 2] = 0  # a hole
  return jnp.asarray(np.where(mask > 0, ids, 0)), jnp.asarray(mask)


def unavailable(a, impl) -> str:
  """Why `impl` cannot run here ('' if it can)."""
  if impl == 'cudnn':
    if jax.default_backend() != 'gpu':
      return f'cudnn attention needs an NVIDIA GPU (backend here: {jax.default_backend()})'
    if a.dtype == 'float32':
      return 'cudnn attention needs --dtype bfloat16 or float16'
  return ''


def run(a, impl, params, ids, mask) -> dict:
  """Outputs, gradients and forward time of one implementation (`'explicit'` = the einsum path)."""
  explicit = impl == 'explicit'
  cfg = bert.ModelConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                         num_hidden_layers=a.num_hidden_layers,
                         num_attention_heads=max(1, a.hidden_size // 64),
                         intermediate_size=4 * a.hidden_size, dtype=getattr(jnp, a.dtype),
                         attention_implementation=None if explicit or impl == 'default' else impl)
  model = bert.MaskedLM(cfg)
  valid = mask[..., None] > 0

  def forward(p):
    out = model.apply({'params': p}, ids, mask, output_attentions=explicit)
    return out.logits, out.hidden_states[-1]

  def scalar(p):  # a smooth function of every real token's logits
    logits = forward(p)[0].astype(jnp.float32)
    return jnp.sum(jnp.where(valid, jax.nn.logsumexp(logits, -1, keepdims=True), 0.0)) / valid.sum()

  fwd = jax.jit(forward)
  logits, hidden = jax.block_until_ready(fwd(params))
  grads = jax.jit(jax.grad(scalar))(params)
  times = []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    for _ in range(a.steps):
      out = fwd(params)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / a.steps)
  return {'logits': logits, 'hidden': hidden, 'grads': grads,
          'forward_s': min(times), 'tokens_per_s': a.batch_size * a.seq_len / min(times)}


def compare(x, ref, valid=None) -> dict:
  """Max |x - ref| (over `valid` positions) and that relative to max |ref|, as floats."""
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  if valid is not None:
    x, ref = np.where(valid, x, 0.0), np.where(valid, ref, 0.0)
  diff = float(np.abs(x - ref).max())
  return {'max_abs_diff': diff, 'max_rel_diff': diff / max(float(np.abs(ref).max()), 1e-30)}


def main(argv=None):
  a = parse_args(argv)
  ids, mask = make_inputs(a)
  valid = np.asarray(mask)[..., None] > 0
  cfg = bert.ModelConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                         num_hidden_layers=a.num_hidden_layers,
                         num_attention_heads=max(1, a.hidden_size // 64),
                         intermediate_size=4 * a.hidden_size)
  params = bert.init_params(cfg, jax.random.PRNGKey(0), seq_len=a.seq_len)
  print(f'devices: {jax.local_device_count()} x {jax.local_devices()[0].device_kind}; jax '
        f'{jax.__version__}; {a.num_hidden_layers} x {a.hidden_size}, batch {a.batch_size} x '
        f'{a.seq_len}, {a.dtype}; padded rows {int((np.asarray(mask) == 0).any(-1).sum())}',
        flush=True)
  result = {'args': vars(a), 'device_kind': jax.local_devices()[0].device_kind,
            'platform': jax.default_backend(), 'jax_version': jax.__version__,
            'tolerance_rel': TOLERANCE[a.dtype], 'implementations': {}, 'complete': False}
  if a.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
  ref = None
  for impl in ('explicit', 'default', 'xla', 'cudnn'):
    why = unavailable(a, impl)
    if why:
      print(f'{impl}: skipped ({why})', flush=True)
      result['implementations'][impl] = {'status': 'skipped', 'reason': why}
      continue
    try:
      r = run(a, impl, params, ids, mask)
    except Exception as e:  # pylint: disable=broad-except  (cuDNN may refuse a shape)
      traceback.print_exc()
      result['implementations'][impl] = {'status': 'failed',
                                         'error': f'{type(e).__name__}: {e}'[:2000]}
      continue
    ref = ref or r
    g, g_ref = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
                for t in (r['grads'], ref['grads']))
    entry = {'status': 'ok', 'forward_ms': r['forward_s'] * 1e3, 'tokens_per_s': r['tokens_per_s'],
             'logits': compare(r['logits'], ref['logits'], valid),
             'last_hidden': compare(r['hidden'], ref['hidden'], valid), 'grads': compare(g, g_ref)}
    entry['within_tolerance'] = all(entry[k]['max_rel_diff'] <= TOLERANCE[a.dtype]
                                    for k in ('logits', 'last_hidden', 'grads'))
    entry['forward_speedup_vs_explicit'] = ref['forward_s'] / r['forward_s']
    result['implementations'][impl] = entry
    print(f"{impl}: forward {entry['forward_ms']:.2f} ms "
          f"({entry['forward_speedup_vs_explicit']:.2f}x explicit); max rel diff vs explicit: "
          f"logits {entry['logits']['max_rel_diff']:.2e}, last hidden "
          f"{entry['last_hidden']['max_rel_diff']:.2e}, grads {entry['grads']['max_rel_diff']:.2e} "
          f"(tolerance {TOLERANCE[a.dtype]:g})", flush=True)
    if a.json_out:
      atomic.write_json(a.json_out, result)
  result['complete'] = True
  if a.json_out:
    atomic.write_json(a.json_out, result)
    print(f'wrote {a.json_out}')


if __name__ == '__main__':
  main()
