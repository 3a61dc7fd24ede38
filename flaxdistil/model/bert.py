"""BERT / DistilBERT masked language models in Flax linen.

One post-LayerNorm transformer encoder serves both the teacher (BERT, HF
``BertForMaskedLM`` / ``BertModel`` without pooler) and the student (DistilBERT,
HF ``DistilBertForMaskedLM`` / ``DistilBertModel``). The two HF architectures
compute the same function; DistilBERT only drops the token-type embeddings (and
the pooler, which we never build). Using a single parameter tree layout for both
lets a student be initialised from teacher subtrees directly (see
``student_init.init_student_from_teacher``).

Parameter tree (kernels are ``[in, out]``, i.e. the transpose of torch Linear)::

  embeddings/word_embeddings/embedding          [V, H]   ('vocab', 'embed')
  embeddings/position_embeddings/embedding      [P, H]   (None, 'embed')
  embeddings/token_type_embeddings/embedding    [T, H]   (None, 'embed')   bert only
  embeddings/LayerNorm/{scale,bias}             [H]      ('embed',)
  encoder/layer_{i}/attention/{query,key,value}/kernel [H, A_i] ('embed', 'heads'), bias ('heads',)
  encoder/layer_{i}/attention/output/kernel     [A_i, H] ('heads', 'embed'), bias ('embed',)
  encoder/layer_{i}/attention_layer_norm        [H]
  encoder/layer_{i}/intermediate/kernel         [H, I]   ('embed', 'mlp'), bias ('mlp',)
  encoder/layer_{i}/output/kernel               [I, H]   ('mlp', 'embed'), bias ('embed',)
  encoder/layer_{i}/output_layer_norm           [H]
  mlm_head/transform/kernel                     [H, H]   ('embed', None), bias (None,)
  mlm_head/transform_layer_norm                 [H]
  mlm_head/bias                                 [V]      ('vocab',)
  classifier_head/pre_classifier/kernel         [H, H]   ('embed', None), bias (None,)
  classifier_head/classifier/kernel             [H, C]   (None, None), bias (None,)

``classifier_head`` exists only with ``num_labels = C > 0``, ``mlm_head`` only
with ``with_mlm_head=True``. ``A_i = heads_i * head_dim`` is H unless heads of layer i were
pruned (``ModelConfig.pruned_heads``, HF's ``pruned_heads``: Michel et al., 2019): then only the
kept heads' columns remain, in their original order. Such layers differ in shape, so a stack of
them is unrolled, never scanned.

Pruning importance (``training/importance.py``) multiplies each head's output and each FFN
neuron by a gate when the ``gates`` collection is given to ``apply`` (Michel et al.'s xi_h):
``{'encoder': {'layer_i': {'attention': {'head': [heads_i]}, 'ffn': [I]}}}`` (``gate_ones``);
without it the model has no gates.

The MLM decoder is tied to the word embeddings (HF ``tie_word_embeddings=True``):
``logits = word_embeddings.attend(h) + mlm_head.bias``.

This module deliberately imports no config (ml_collections) or IO code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# HF ``_init_weights``: normal(initializer_range=0.02) for Linear/Embedding weights.
_INIT_STD = 0.02

# `implementation` of `jax.nn.dot_product_attention`: None = JAX's choice (XLA on every backend in
# jax 0.10 and 0.11), 'xla', or 'cudnn' (cuDNN fused flash attention; NVIDIA GPUs, bf16/fp16).
ATTENTION_IMPLEMENTATIONS = (None, 'xla', 'cudnn')

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF "gelu" is the exact erf formulation (torch.nn.functional.gelu default).
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    # HF "gelu_new" / "gelu_pytorch_tanh" are the tanh approximation.
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'relu': jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters, named like HF ``BertConfig``.

  ``model_type='bert'`` has token-type embeddings (HF BertForMaskedLM/BertModel);
  ``'distilbert'`` has none (HF DistilBertForMaskedLM/DistilBertModel) and
  ``type_vocab_size`` is ignored. ``dtype`` is the compute dtype (e.g.
  ``jnp.bfloat16``); parameters are always float32. ``dtype``, ``remat`` and
  ``attention_implementation`` change how, not what, the model computes.

  ``pruned_heads`` is ``()`` (nothing pruned) or one tuple per layer of the removed heads'
  original indices (HF ``pruned_heads`` as a per-layer tuple; lists and a ``{layer: heads}``
  dict are normalised to it); ``num_attention_heads`` stays the unpruned count, so ``head_dim``
  does not change.

  Raises:
    ValueError: unknown model_type / hidden_act / attention_implementation,
      hidden_size not divisible by num_attention_heads, num_labels < 0, 'bert'
      with type_vocab_size < 1, or ``pruned_heads`` not one entry per layer of
      distinct heads in range leaving one head.
  """
  model_type: str = 'bert'
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int = 0
  with_mlm_head: bool = True
  num_labels: int = 0               # >0: sequence-classification head on [CLS]
  classifier_dropout: float = 0.1   # HF BERT: hidden_dropout_prob; DistilBERT: seq_classif_dropout
  pruned_heads: tuple[tuple[int, ...], ...] = ()  # per layer: removed heads (original indices)
  dtype: Any = jnp.float32
  remat: bool = False
  # `jax.nn.dot_product_attention(implementation=...)` where no probabilities or attention dropout
  # are needed (see SelfAttention); one of ATTENTION_IMPLEMENTATIONS.
  attention_implementation: str | None = None
  scan_layers: bool = False         # encoder layers as one lax.scan (see Encoder); same params

  def __post_init__(self):
    object.__setattr__(self, 'pruned_heads', _normalise_pruned_heads(self))
    if self.model_type not in ('bert', 'distilbert'):
      raise ValueError(
          f"ModelConfig.model_type must be 'bert' or 'distilbert', got "
          f'{self.model_type!r}.')
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(
          f'ModelConfig.hidden_act {self.hidden_act!r} is not supported; use '
          f'one of {sorted(_ACTIVATIONS)}.')
    if self.hidden_size % self.num_attention_heads != 0:
      raise ValueError(
          f'hidden_size ({self.hidden_size}) must be divisible by '
          f'num_attention_heads ({self.num_attention_heads}); change one of them.')
    if self.num_labels < 0:
      raise ValueError(f'num_labels must be >= 0 (0 = no classification head), got {self.num_labels}.')
    if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f'ModelConfig.attention_implementation {self.attention_implementation!r} is not '
          f"supported; use None (JAX's default), 'xla' or 'cudnn'.")
    if self.model_type == 'bert' and self.type_vocab_size < 1:
      raise ValueError(
          "model_type 'bert' needs type_vocab_size >= 1 (token-type embeddings); "
          "use model_type 'distilbert' for a model without token types.")

  def layer_num_heads(self, layer: int) -> int:
    """Attention heads of layer `layer` after pruning (`num_attention_heads` if none were)."""
    return self.num_attention_heads - (len(self.pruned_heads[layer]) if self.pruned_heads else 0)

  @property
  def head_dim(self) -> int:
    """Size of one attention head: hidden_size // num_attention_heads."""
    return self.hidden_size // self.num_attention_heads

  @property
  def has_token_types(self) -> bool:
    """True for 'bert' (token-type embeddings), False for 'distilbert'."""
    return self.model_type == 'bert'


# ModelConfig fields that change how, not what, the model computes: left out of run fingerprints
# (a run may resume with another choice) and reset by the export, which verifies on CPU in float32.
COMPUTE_FIELDS = ('dtype', 'remat', 'attention_implementation', 'scan_layers')


def _normalise_pruned_heads(config: ModelConfig) -> tuple[tuple[int, ...], ...]:
  """`config.pruned_heads` as one sorted tuple per layer, or () when no head is pruned."""
  raw = config.pruned_heads
  if isinstance(raw, dict):  # HF {layer: [heads]}, keys may be strings (JSON)
    bad = [k for k in raw if not 0 <= int(k) < config.num_hidden_layers]
    if bad:
      raise ValueError(f'pruned_heads names layers {bad} of a {config.num_hidden_layers}-layer '
                       'model.')
    raw = [raw.get(i, raw.get(str(i), ())) for i in range(config.num_hidden_layers)]
  per_layer = tuple(tuple(sorted(int(h) for h in heads)) for heads in raw)
  if not any(per_layer):
    return ()
  if len(per_layer) != config.num_hidden_layers:
    raise ValueError(f'pruned_heads has {len(per_layer)} entries for {config.num_hidden_layers} '
                     'layers; give one (possibly empty) tuple of head indices per layer.')
  n = config.num_attention_heads
  for i, heads in enumerate(per_layer):
    if len(set(heads)) != len(heads) or any(not 0 <= h < n for h in heads):
      raise ValueError(f'pruned_heads of layer {i} ({list(heads)}) must be distinct heads in '
                       f'[0, {n}).')
    if len(heads) == n:
      raise ValueError(f'pruned_heads removes all {n} heads of layer {i}; keep at least one.')
  return per_layer


class ModelOutput(flax.struct.PyTreeNode):
  """Model outputs.

  Attributes:
    logits: [batch, seq_len, vocab_size] in the compute dtype (num_positions
      instead of seq_len with ``logits_positions``), or None when the model was
      built with ``with_mlm_head=False`` or called with ``return_mlm_hidden``.
    hidden_states: tuple of num_hidden_layers + 1 arrays [batch, seq_len, hidden]
      (embedding output first, then every layer output), as HF
      ``output_hidden_states=True``.
    attentions: tuple of num_hidden_layers float32 arrays
      [batch, heads, seq_len, seq_len] (heads: the layer's, after pruning) of
      attention probabilities (before
      dropout), or None unless ``output_attentions=True``.
    attention_scores: tuple of num_hidden_layers float32 arrays
      [batch, heads, seq_len, seq_len] of pre-softmax attention scores
      ``q.k / sqrt(head_dim) + mask_bias`` (exactly the softmax input, so
      ``softmax(attention_scores[i]) == attentions[i]``); padded keys hold
      ``finfo(float32).min``, so mask them before any arithmetic. None unless
      ``output_attention_scores=True``. Used by TinyBERT's attention loss
      (``intermediate.attention_score_mse``).
    values: tuple of num_hidden_layers arrays [batch, heads, seq_len, head_dim]
      in the compute dtype: each layer's value vectors (HF
      ``BertSelfAttention.value`` output split into heads). None unless
      ``output_values=True``. Used by MiniLM's value-relation loss
      (``intermediate.value_relation_kl``).
    class_logits: [batch, num_labels] float32 sequence-classification logits
      (``config.num_labels > 0``), else None.
    mlm_hidden: [batch, seq_len or num_positions, hidden] compute dtype: the MLM head's
      transformed states before the tied decoder, only with
      ``return_mlm_hidden=True`` (then ``logits`` is None).
  """
  logits: jax.Array | None
  hidden_states: tuple[jax.Array, ...]
  attentions: tuple[jax.Array, ...] | None = None
  attention_scores: tuple[jax.Array, ...] | None = None
  values: tuple[jax.Array, ...] | None = None
  class_logits: jax.Array | None = None
  mlm_hidden: jax.Array | None = None


def _init(names, init=None):
  """Parameter initializer annotated with logical axis names."""
  if init is None:
    init = nn.initializers.normal(stddev=_INIT_STD)
  return nn.with_logical_partitioning(init, names)


def _dense(config: ModelConfig, features: int, names, name: str) -> nn.Dense:
  kernel_names, bias_names = names
  return nn.Dense(
      features,
      dtype=config.dtype,
      param_dtype=jnp.float32,
      kernel_init=_init(kernel_names),
      bias_init=_init(bias_names, nn.initializers.zeros),
      name=name)


def _layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  # use_fast_variance=False: two-pass variance like torch.nn.LayerNorm; the
  # E[x^2]-E[x]^2 shortcut loses precision and breaks 1e-4 parity with HF.
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=config.dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      scale_init=_init(('embed',), nn.initializers.ones),
      bias_init=_init(('embed',), nn.initializers.zeros),
      name=name)


class Embeddings(nn.Module):
  """Word + position (+ token type) embeddings, LayerNorm, dropout.

  Matches HF ``BertEmbeddings`` (absolute positions 0..T-1 regardless of padding)
  and DistilBERT ``Embeddings`` (no token types).
  """
  config: ModelConfig

  def setup(self):
    """Declares the embedding tables, LayerNorm and dropout."""
    cfg = self.config
    self.word_embeddings = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
        param_dtype=jnp.float32, embedding_init=_init(('vocab', 'embed')))
    self.position_embeddings = nn.Embed(
        cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
        param_dtype=jnp.float32, embedding_init=_init((None, 'embed')))
    if cfg.has_token_types:
      self.token_type_embeddings = nn.Embed(
          cfg.type_vocab_size, cfg.hidden_size, dtype=cfg.dtype,
          param_dtype=jnp.float32, embedding_init=_init((None, 'embed')))
    self.LayerNorm = _layer_norm(cfg, 'LayerNorm')  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    """input_ids/token_type_ids: [B, T] int -> [B, T, H] compute dtype."""
    seq_len = input_ids.shape[1]
    x = self.word_embeddings(input_ids)
    x = x + self.position_embeddings(jnp.arange(seq_len)[None, :])
    if self.config.has_token_types:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + self.token_type_embeddings(token_type_ids)
    x = self.LayerNorm(x)
    x = self.dropout(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))

  def attend(self, x):
    """Tied decoder: `x @ word_embeddings.T`.

    Returns:
      `[B, T, V]` logits in the compute dtype for `x` `[B, T, H]` (no bias).
    """
    return self.word_embeddings.attend(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention (HF ``BertSelfAttention`` + output dense).

  Scores and softmax are computed in float32 even for bf16 compute. When the
  probabilities are not needed as outputs and no attention dropout applies
  (eval, the teacher forward, or ``attention_probs_dropout_prob=0``), the core
  goes through ``jax.nn.dot_product_attention`` with
  ``implementation=config.attention_implementation``: None (the default) is its
  XLA implementation on every backend in jax 0.10 and 0.11; ``'cudnn'`` is cuDNN's
  fused flash attention (NVIDIA GPUs, bf16/fp16 compute only). The student's
  training forward keeps the explicit softmax: jax's API takes no dropout.

  ``num_heads`` is this layer's head count (None = ``num_attention_heads``; fewer after pruning).
  """
  config: ModelConfig
  num_heads: int | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, need_probs: bool = True):
    """x: [B, T, H]; bias: [B, 1, 1, T] float32 additive mask.

    Returns (output [B, T, H], probs [B, heads, T, T] float32,
    scores [B, heads, T, T] float32 (softmax input), values [B, heads, T, head_dim]);
    probs and scores are None when ``need_probs`` is False and the
    ``dot_product_attention`` path ran. Unused returns are dead code that XLA
    removes under jit.
    """
    cfg = self.config
    b, t, _ = x.shape
    heads = cfg.num_attention_heads if self.num_heads is None else self.num_heads
    width = heads * cfg.head_dim  # = hidden_size unless heads were pruned
    qkv_names = (('embed', 'heads'), ('heads',))
    split = lambda y: y.reshape(b, t, heads, cfg.head_dim)
    q = split(_dense(cfg, width, qkv_names, 'query')(x))  # [B, T, heads, D]
    k = split(_dense(cfg, width, qkv_names, 'key')(x))
    v = split(_dense(cfg, width, qkv_names, 'value')(x))
    if not need_probs and (deterministic or cfg.attention_probs_dropout_prob == 0.0):
      # jax's API takes no dropout, hence the condition. A boolean key mask
      # gives the same softmax as the additive finfo.min bias (exp underflows to 0).
      mask = bias > jnp.finfo(jnp.float32).min / 2  # [B, 1, 1, T]
      if cfg.attention_implementation == 'cudnn':
        # cuDNN takes a mask only as a bias of the full [T, T] extent; right-padding-only
        # sequence lengths would be faster but wrong for any other mask.
        mask = jnp.broadcast_to(mask, (b, 1, t, t))
      ctx = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                         implementation=cfg.attention_implementation)
      probs = scores = None
    else:
      scores = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                          preferred_element_type=jnp.float32)
      scores = scores * (cfg.head_dim ** -0.5) + bias
      probs = jax.nn.softmax(scores, axis=-1)
      dropped = nn.Dropout(cfg.attention_probs_dropout_prob)(
          probs, deterministic=deterministic)
      ctx = jnp.einsum('bhqk,bkhd->bqhd', dropped.astype(cfg.dtype), v)
    if self.has_variable('gates', 'head'):  # Michel et al.'s xi_h on each head's output
      ctx = ctx * self.get_variable('gates', 'head').astype(ctx.dtype)[None, None, :, None]
    ctx = ctx.reshape(b, t, width)
    out = _dense(cfg, cfg.hidden_size, (('heads', 'embed'), ('embed',)),
                 'output')(ctx)
    return out, probs, scores, v.transpose(0, 2, 1, 3)


class TransformerLayer(nn.Module):
  """Post-LN encoder layer (HF ``BertLayer`` / DistilBERT ``TransformerBlock``).

  Dropout as in HF: BERT drops the attention output before the residual,
  DistilBERT's ``TransformerBlock`` does not. ``num_heads`` as ``SelfAttention``'s.
  """
  config: ModelConfig
  num_heads: int | None = None

  @nn.compact
  def __call__(self, x, bias, deterministic: bool = True, need_probs: bool = True):
    """x: [B, T, H] -> ([B, T, H], (probs, scores, values)) as SelfAttention."""
    cfg = self.config
    attn, *attn_out = SelfAttention(cfg, self.num_heads, name='attention')(
        x, bias, deterministic, need_probs)
    if cfg.model_type == 'bert':
      attn = nn.Dropout(cfg.hidden_dropout_prob)(attn, deterministic=deterministic)
    x = _layer_norm(cfg, 'attention_layer_norm')(x + attn)
    h = _dense(cfg, cfg.intermediate_size, (('embed', 'mlp'), ('mlp',)),
               'intermediate')(x)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    if self.has_variable('gates', 'ffn'):  # a gate per FFN neuron (pruning importance)
      h = h * self.get_variable('gates', 'ffn').astype(h.dtype)
    h = nn.with_logical_constraint(h, ('act_batch', 'act_len', 'act_mlp'))
    h = _dense(cfg, cfg.hidden_size, (('mlp', 'embed'), ('embed',)), 'output')(h)
    h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    x = _layer_norm(cfg, 'output_layer_norm')(x + h)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))
    return x, tuple(attn_out)


class Encoder(nn.Module):
  """Stack of ``num_hidden_layers`` TransformerLayers named ``layer_{i}``.

  ``config.scan_layers`` runs the layers as one ``jax.lax.scan`` over their params stacked on a
  new leading axis (stacked at each call, so the parameter tree stays ``layer_{i}`` for
  checkpoints, HF conversion and student init): XLA compiles one layer instead of L, and with
  ``config.remat`` each layer's activations are recomputed in the backward pass from the
  layer's input (``jax.checkpoint`` with no saved residuals). Same function and gradients as the
  unrolled stack; with dropout the masks come from another rng stream (the layer's rng is split
  from one draw per call instead of being derived from the module path). Layers whose params
  differ in shape (pruned heads: each layer has its own head count, `ModelConfig.layer_num_heads`)
  cannot be stacked and run unrolled.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, need_probs: bool = True,
               need_values: bool = True):
    """x: [B, T, H] -> (hidden_states, (probs, scores, values)), each a tuple over layers.

    ``need_values=False`` lets the scanned stack skip collecting the value vectors (the
    unrolled one leaves unused outputs to XLA's dead-code elimination); they are then None.
    """
    cfg = self.config
    if cfg.scan_layers and not self.is_initializing():
      stacked = self._stacked_layer_params()
      if stacked is not None:
        return self._scan(stacked, x, bias, deterministic, need_probs, need_values)
    layer_cls = TransformerLayer
    if cfg.remat:
      # Argument 0 is the module itself, so `deterministic` and `need_probs` are argnums 3, 4.
      layer_cls = nn.remat(TransformerLayer, static_argnums=(3, 4))
    hidden_states, attn_outputs = [x], []
    for i in range(cfg.num_hidden_layers):
      x, attn_out = layer_cls(cfg, cfg.layer_num_heads(i), name=f'layer_{i}')(
          x, bias, deterministic, need_probs)
      hidden_states.append(x)
      attn_outputs.append(attn_out)
    # (probs, scores, values), each a tuple over layers.
    per_kind = tuple(tuple(a) for a in zip(*attn_outputs)) or ((), (), ())
    return tuple(hidden_states), per_kind

  def _stacked_layer_params(self):
    """The layers' params stacked on a leading `[L]` axis, or None if their shapes differ."""
    params = self.variables.get('params', {})
    layers = [params.get(f'layer_{i}') for i in range(self.config.num_hidden_layers)]
    if not layers or any(p is None for p in layers):
      return None
    shapes = [jax.tree.map(jnp.shape, p) for p in layers]
    if any(s != shapes[0] for s in shapes[1:]):
      return None
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)

  def _scan(self, stacked, x, bias, deterministic, need_probs, need_values):
    """The stack as `lax.scan` over `stacked` layer params (`_stacked_layer_params`)."""
    cfg = self.config
    n = cfg.num_hidden_layers
    # equal param shapes (`_stacked_layer_params`) mean equal head counts
    layer = TransformerLayer(cfg, cfg.layer_num_heads(0), parent=None)
    use_dropout = not deterministic
    keys = jax.random.split(self.make_rng('dropout'), n) if use_dropout else jnp.zeros((n, 2),
                                                                                          jnp.uint32)

    def body(h, xs):
      p, key = xs
      rngs = {'dropout': key} if use_dropout else {}
      h, (probs, scores, values) = layer.apply({'params': p}, h, bias, deterministic, need_probs,
                                               rngs=rngs)
      return h, (h, probs if need_probs else None, scores if need_probs else None,
                 values if need_values else None)

    if cfg.remat:
      body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    _, (hs, probs, scores, values) = jax.lax.scan(body, x, (stacked, keys))
    unstack = lambda a: None if a is None else tuple(a[i] for i in range(n))
    per_kind = (unstack(probs) or (None,) * n, unstack(scores) or (None,) * n,
                unstack(values) or (None,) * n)
    return (x,) + unstack(hs), per_kind


class MLMHead(nn.Module):
  """Transform + LayerNorm + tied decoder + bias.

  Matches HF ``BertOnlyMLMHead`` (dense, hidden_act, LayerNorm, decoder) and
  DistilBERT's ``vocab_transform``/``activation``/``vocab_layer_norm``/
  ``vocab_projector``.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, embeddings: Embeddings, project: bool = True):
    """x: [B, T, H] -> logits [B, T, V] (compute dtype).

    ``project=False`` stops before the tied decoder and returns the
    transformed hidden states [B, T, H], for losses that apply the decoder
    themselves a chunk at a time (``chunked_vocab.chunked_vocab_terms``).
    """
    cfg = self.config
    h = _dense(cfg, cfg.hidden_size, (('embed', None), (None,)), 'transform')(x)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    h = _layer_norm(cfg, 'transform_layer_norm')(h)
    bias = self.param('bias', _init(('vocab',), nn.initializers.zeros),
                      (cfg.vocab_size,), jnp.float32)
    if not project:
      return nn.with_logical_constraint(h, ('act_batch', 'act_len', 'act_embed'))
    logits = embeddings.attend(h) + bias.astype(cfg.dtype)
    return nn.with_logical_constraint(logits, ('act_batch', 'act_len', 'vocab'))


class ClassificationHead(nn.Module):
  """Sequence classification from the first ([CLS]) token.

  'bert': HF ``BertPooler`` (dense + tanh) -> dropout -> ``classifier``
  (``BertForSequenceClassification``); 'distilbert': ``pre_classifier`` ->
  ReLU -> dropout -> ``classifier`` (``DistilBertForSequenceClassification``).
  The first dense is called ``pre_classifier`` for both so a BERT teacher's
  pooler can initialise a DistilBERT student's head.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x: [B, T, H] -> class logits [B, num_labels] float32."""
    cfg = self.config
    h = _dense(cfg, cfg.hidden_size, (('embed', None), (None,)), 'pre_classifier')(x[:, 0])
    h = jnp.tanh(h) if cfg.model_type == 'bert' else nn.relu(h)
    h = nn.Dropout(cfg.classifier_dropout)(h, deterministic=deterministic)
    logits = _dense(cfg, cfg.num_labels, ((None, None), (None,)), 'classifier')(h)
    return logits.astype(jnp.float32)


class MaskedLM(nn.Module):
  """BERT / DistilBERT encoder with optional tied MLM head.

  Matches HF ``BertForMaskedLM`` / ``DistilBertForMaskedLM`` (or, with
  ``config.with_mlm_head=False``, ``BertModel`` without pooler /
  ``DistilBertModel``; with ``config.num_labels > 0`` also
  ``*ForSequenceClassification``) in eval mode to ~1e-5 in float32.
  """
  config: ModelConfig

  def setup(self):
    """Declares embeddings, encoder and the configured heads."""
    self.embeddings = Embeddings(self.config)
    self.encoder = Encoder(self.config)
    if self.config.with_mlm_head:
      self.mlm_head = MLMHead(self.config)
    if self.config.num_labels:
      self.classifier_head = ClassificationHead(self.config)

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               deterministic: bool = True,
               output_attentions: bool = False,
               output_attention_scores: bool = False,
               output_values: bool = False,
               logits_positions=None,
               return_mlm_hidden: bool = False) -> ModelOutput:
    """Runs the model.

    Args:
      input_ids: [batch, seq_len] int32 token ids.
      attention_mask: [batch, seq_len] int (1 = token, 0 = padding). Padded keys
        get an additive ``finfo(float32).min`` bias like HF; outputs at padded
        query positions are meaningless.
      token_type_ids: [batch, seq_len] int32 or None (= all zeros, as HF). Ignored
        for ``model_type='distilbert'``, which has no token types.
      deterministic: False enables dropout and needs a 'dropout' rng.
      output_attentions: also return per-layer attention probabilities.
      output_attention_scores: also return per-layer pre-softmax attention
        scores (TinyBERT attention transfer); off by default.
      output_values: also return per-layer value vectors (MiniLM value
        relation); off by default. ``intermediate.model_kwargs(weights)`` gives
        the flags a set of intermediate-layer loss weights needs.
      logits_positions: optional [batch, num_positions] int32 indices into
        seq_len; the MLM head then runs only there and `logits` is
        [batch, num_positions, vocab_size]. With MLM and KL terms restricted
        to masked tokens this skips ~85% of the vocab projection, the most
        expensive matmul of a small model (BERT pretraining's
        `masked_lm_positions` does the same).
      return_mlm_hidden: run the MLM head up to (not including) the tied
        decoder: `logits` is None and `mlm_hidden` [batch, seq_len or
        num_positions, hidden] holds its input; `vocab_projection(params)`
        gives the decoder, so a loss can form the logits chunk by chunk.

    Returns:
      ModelOutput (see its docstring for shapes).

    Raises:
      ValueError: input_ids not rank 2, attention_mask / token_type_ids shape
        differs from input_ids, or seq_len > max_position_embeddings.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(
          f'input_ids must be [batch, seq_len], got shape {input_ids.shape}.')
    if attention_mask.shape != input_ids.shape:
      raise ValueError(
          f'attention_mask shape {attention_mask.shape} must equal input_ids '
          f'shape {input_ids.shape}.')
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
      raise ValueError(
          f'token_type_ids shape {token_type_ids.shape} must equal input_ids '
          f'shape {input_ids.shape} (or pass None).')
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(
          f'seq_len {input_ids.shape[1]} exceeds max_position_embeddings '
          f'{cfg.max_position_embeddings}; truncate or pack inputs to at most '
          f'{cfg.max_position_embeddings} tokens.')
    if not cfg.has_token_types:
      token_type_ids = None

    # [B, 1, 1, T]: 0 for tokens, most negative float32 for padded keys (HF).
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = self.embeddings(input_ids, token_type_ids, deterministic)
    hidden_states, (attentions, scores, values) = self.encoder(
        x, bias, deterministic, output_attentions or output_attention_scores, output_values)
    logits = mlm_hidden = None
    if cfg.with_mlm_head:
      h = hidden_states[-1]
      if logits_positions is not None:
        h = jnp.take_along_axis(h, logits_positions[..., None], axis=1)  # [B, M, H]
      if return_mlm_hidden:
        mlm_hidden = self.mlm_head(h, self.embeddings, project=False)
      else:
        logits = self.mlm_head(h, self.embeddings)
    class_logits = None
    if cfg.num_labels:
      class_logits = self.classifier_head(hidden_states[-1], deterministic)
    return ModelOutput(
        logits=logits,
        hidden_states=hidden_states,
        attentions=attentions if output_attentions else None,
        attention_scores=scores if output_attention_scores else None,
        values=values if output_values else None,
        class_logits=class_logits,
        mlm_hidden=mlm_hidden)


def unbox(tree):
  """Strips ``nn.Partitioned`` metadata boxes.

  Returns:
    `tree` with every boxed leaf replaced by its value (arrays or
    ``ShapeDtypeStruct``s); unboxed leaves pass through.
  """
  return nn.meta.unbox(tree)


def _dummy_inputs(config: ModelConfig, seq_len: int):
  seq_len = min(seq_len, config.max_position_embeddings)
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return ids, jnp.ones((1, seq_len), jnp.int32)


def _init_boxed(config: ModelConfig, rng: jax.Array, seq_len: int = 8):
  ids, mask = _dummy_inputs(config, seq_len)
  return MaskedLM(config).init({'params': rng}, ids, mask)['params']


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8):
  """Randomly initialised float32 params (HF ``_init_weights``), unboxed.

  Kernels/embeddings ~ normal(0.02), biases 0, LayerNorm scale 1.

  Args:
    config: the architecture.
    rng: PRNG key of the initialisation.
    seq_len: length of the dummy input traced by ``init`` (capped at
      max_position_embeddings); the params do not depend on it.

  Returns:
    Nested dict of float32 ``jax.Array``s laid out as in the module docstring.
  """
  fn = jax.jit(functools.partial(_init_boxed, config, seq_len=seq_len))
  return unbox(fn(rng))


def abstract_params(config: ModelConfig):
  """The params' shapes without allocating or computing them (``jax.eval_shape``).

  Returns:
    The ``init_params`` tree, boxed: leaves are ``nn.Partitioned`` holding
    float32 ``jax.ShapeDtypeStruct``s with logical axis names; use
    ``nn.get_partition_spec`` / ``nn.logical_to_mesh_sharding`` on it, or
    ``unbox`` it for plain shapes.
  """
  return jax.eval_shape(
      functools.partial(_init_boxed, config), jax.random.PRNGKey(0))


def vocab_projection(params) -> tuple[jax.Array, jax.Array]:
  """The tied MLM decoder of an unboxed params tree.

  `logits = mlm_hidden @ embedding.T + bias` (HF ``BertLMPredictionHead.decoder``
  / DistilBERT ``vocab_projector``, tied to the word embeddings).

  Returns:
    `(embedding [V, H], bias [V])`, the params' own (float32) arrays.

  Raises:
    KeyError: the params have no MLM head (``with_mlm_head=False``).
  """
  return params['embeddings']['word_embeddings']['embedding'], params['mlm_head']['bias']


def count_params(params) -> int:
  """Number of scalar parameters of a boxed, unboxed or abstract params tree (an int)."""
  leaves = jax.tree_util.tree_leaves(unbox(params))
  return int(sum(int(np.prod(x.shape)) for x in leaves))


def gate_ones(config: ModelConfig) -> dict:
  """The ``gates`` collection with every gate at 1 (the model's own function).

  Pass it as ``model.apply({'params': p, 'gates': g}, ...)`` and differentiate with respect to
  ``g`` for Michel et al.'s (2019) importance ``|dL/dxi|`` of every head and FFN neuron.

  Returns:
    ``{'encoder': {'layer_i': {'attention': {'head': [heads_i]}, 'ffn': [intermediate_size]}}}``
    of float32 ones.
  """
  return {'encoder': {f'layer_{i}': {
      'attention': {'head': jnp.ones((config.layer_num_heads(i),), jnp.float32)},
      'ffn': jnp.ones((config.intermediate_size,), jnp.float32)}
      for i in range(config.num_hidden_layers)}}
