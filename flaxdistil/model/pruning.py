"""Structured pruning of attention heads and FFN neurons in Flax params (Michel et al., 2019).

Michel, Levy and Neubig, "Are Sixteen Heads Really Better than One?" (NeurIPS 2019), Sec. 4:
a head's importance is I_h = E_x |dL(x)/d xi_h| for a gate xi_h = 1 on its output (Eq. 2),
normalised per layer by the l2 norm, and the heads of lowest importance over the whole model are
removed. The same gate on each FFN neuron ranks neurons. The gradients themselves are
`training/importance.py`'s; this module chooses what to remove (`select_heads`, `select_ffn`)
and removes it (`prune`), giving the smaller `ModelConfig` and params.

Export constraint: transformers >= 5 builds every layer with `intermediate_size` FFN neurons
and `num_attention_heads` heads, so the FFN keeps one width across layers (the same number of
neurons per layer, each layer's most important), while heads are removed per layer and recorded in
`ModelConfig.pruned_heads` (HF's `pruned_heads`; `hf_conversion` writes them back as zero weights,
`export/torch_models.py` removes them again in torch).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from flaxdistil.model import bert
from flaxdistil.model.bert import ModelConfig


def _check_fraction(name: str, fraction: float) -> None:
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'{name}={fraction}: the fraction to prune must be in [0, 1).')


def select_heads(importance: Sequence[np.ndarray], fraction: float, *,
                 normalize: bool = True) -> tuple[tuple[int, ...], ...]:
  """The heads to remove: the `fraction` of all heads of lowest importance, over all layers.

  Each layer keeps at least one head (the next-lowest head of another layer goes instead).

  Args:
    importance: per layer, `[heads_i]` float importance of its current heads (I_h >= 0).
    fraction: share of the current heads to remove, in [0, 1); `round(fraction * total)` heads.
    normalize: divide each layer's scores by their l2 norm first (Michel et al., Sec. 4.2:
      makes layers comparable for the global ranking).

  Returns:
    Per layer, the sorted local indices (into the layer's current heads) to remove.

  Raises:
    ValueError: `fraction` outside [0, 1), or more heads asked for than can go at one per layer.
  """
  _check_fraction('heads', fraction)
  scores = [np.asarray(x, np.float64) for x in importance]
  if normalize:
    scores = [s / max(float(np.linalg.norm(s)), 1e-30) for s in scores]
  total = sum(len(s) for s in scores)
  n_remove = int(round(fraction * total))
  if n_remove > total - len(scores):
    raise ValueError(f'Cannot remove {n_remove} of {total} heads and keep one per layer in '
                     f'{len(scores)} layers; use a smaller fraction.')
  order = sorted((float(v), i, h) for i, s in enumerate(scores) for h, v in enumerate(s))
  left = [len(s) for s in scores]
  out = [[] for _ in scores]
  for _, i, h in order:
    if sum(map(len, out)) == n_remove:
      break
    if left[i] > 1:
      out[i].append(h)
      left[i] -= 1
  return tuple(tuple(sorted(x)) for x in out)


def select_ffn(importance: Sequence[np.ndarray], fraction: float) -> list[np.ndarray]:
  """The FFN neurons to keep: the same count in every layer, each layer's most important.

  Args:
    importance: per layer, `[intermediate_size]` importance of each neuron.
    fraction: share of each layer's neurons to remove, in [0, 1).

  Returns:
    Per layer, the sorted int indices of the `max(1, round(I * (1 - fraction)))` kept neurons.

  Raises:
    ValueError: `fraction` outside [0, 1), or layers of different widths.
  """
  _check_fraction('ffn', fraction)
  widths = {len(x) for x in importance}
  if len(widths) != 1:
    raise ValueError(f'FFN importance of unequal widths {sorted(widths)}; the layers must share '
                     'one intermediate_size.')
  width = widths.pop()
  keep = max(1, int(round(width * (1.0 - fraction))))
  # stable order: ties keep the lower index
  return [np.sort(np.argsort(-np.asarray(x, np.float64), kind='stable')[:keep]) for x in importance]


def kept_heads(config: ModelConfig, layer: int) -> list[int]:
  """Original indices of the heads layer `layer` still has, in the order its params hold them."""
  gone = set(config.pruned_heads[layer]) if config.pruned_heads else set()
  return [h for h in range(config.num_attention_heads) if h not in gone]


def prune(params, config: ModelConfig, heads: Sequence[Sequence[int]] | None = None,
          ffn_keep: Sequence[np.ndarray] | None = None):
  """Removes heads (local indices per layer) and FFN neurons from params.

  Head j of layer i is the columns `[j * head_dim, (j + 1) * head_dim)` of the query, key and
  value kernels and biases and the same rows of the attention output kernel; neuron n the column
  n of the intermediate kernel and bias and the row n of the FFN output kernel. A model pruned
  before is pruned further: its `pruned_heads` grow (original indices).

  Args:
    params: unboxed params of `config` (host or device arrays).
    config: their config.
    heads: per layer, local indices of the heads to remove (`select_heads`); None = none.
    ffn_keep: per layer, the neuron indices to keep, equally many per layer (`select_ffn`);
      None = all.

  Returns:
    `(config, params)`: the pruned `ModelConfig` (`pruned_heads`, `intermediate_size`) and its
    params, float32 host numpy, shaped like `bert.init_params` of it.

  Raises:
    ValueError: a layer count that does not match, a head index out of range, a layer left
      without heads, or unequal / out-of-range FFN index lists.
  """
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), bert.unbox(params))
  n_layers, d = config.num_hidden_layers, config.head_dim
  heads = [()] * n_layers if heads is None else [tuple(int(h) for h in x) for x in heads]
  if len(heads) != n_layers or (ffn_keep is not None and len(ffn_keep) != n_layers):
    raise ValueError(f'Give one entry per layer ({n_layers}) for heads and ffn_keep.')
  pruned_heads, widths = [], set()
  for i in range(n_layers):
    layer = p['encoder'][f'layer_{i}']
    current = kept_heads(config, i)
    bad = [h for h in heads[i] if not 0 <= h < len(current)]
    if bad:
      raise ValueError(f'Layer {i} has {len(current)} heads; cannot remove heads {bad}.')
    keep = [j for j in range(len(current)) if j not in set(heads[i])]
    if not keep:
      raise ValueError(f'Removing heads {list(heads[i])} leaves layer {i} without heads.')
    cols = np.concatenate([np.arange(j * d, (j + 1) * d) for j in keep])
    att = layer['attention']
    for name in ('query', 'key', 'value'):
      att[name] = {'kernel': att[name]['kernel'][:, cols], 'bias': att[name]['bias'][cols]}
    att['output'] = dict(att['output'], kernel=att['output']['kernel'][cols])
    pruned_heads.append(tuple(sorted(set(range(config.num_attention_heads)) -
                                     {current[j] for j in keep})))
    if ffn_keep is not None:
      idx = np.asarray(ffn_keep[i], np.int64)
      if idx.size == 0 or idx.min() < 0 or idx.max() >= config.intermediate_size or (
          len(set(idx.tolist())) != idx.size):
        raise ValueError(f'ffn_keep of layer {i} must be distinct indices in '
                         f'[0, {config.intermediate_size}).')
      widths.add(idx.size)
      layer['intermediate'] = {'kernel': layer['intermediate']['kernel'][:, idx],
                               'bias': layer['intermediate']['bias'][idx]}
      layer['output'] = dict(layer['output'], kernel=layer['output']['kernel'][idx])
  if len(widths) > 1:
    raise ValueError(f'ffn_keep keeps {sorted(widths)} neurons in different layers; keep the same '
                     'number in every layer (one intermediate_size).')
  new = dataclasses.replace(config, pruned_heads=tuple(pruned_heads),
                            intermediate_size=widths.pop() if widths else config.intermediate_size)
  return new, p
