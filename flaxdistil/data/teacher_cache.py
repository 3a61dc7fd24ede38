"""Offline distillation: the teacher's targets computed once, stored, and read back per batch.

The builder (`flaxdistil/cache_teacher.py`, `python -m flaxdistil.cache_teacher`) runs the teacher
over packed training rows and stores, for every position of
each row, its top-k logits (values in bfloat16/float16/float32 + int32 ids, sorted descending),
`logsumexp_V(t/T)` (float32, for the optional tail bucket), optionally the last hidden state, and
the intermediate outputs the config's TinyBERT/MiniLM terms read (`needed_layers`).
`TeacherCache(dir)` reads it back; `TeacherCache.features(rows)` is the `row_features` hook of
`input_pipeline.BatchIterator`, so cached targets travel with the batch through the prefetch thread.

What the teacher sees (`teacher.cache_teacher_input`):
- 'original' (default): the unmasked packed rows. A cache computed once cannot follow dynamic
  masking (a new masking every step), so targets are stored for every non-padding position of the
  original row and the train step gathers them at whatever positions the step masks; any seed,
  batch size or masking can train from it. Online distillation with
  `distill.teacher_input='original'` is the exactly equivalent online objective (tested equal at
  k = V). But with the answer in its input the teacher's targets at masked positions are
  label-like (docs/offline.md).
- 'masked': this run's own masked stream (the HF distiller's objective, `teacher_input='masked'`):
  the masking is a pure function of (seed, step), so the builder replays it and stores the
  teacher's targets per sample `step * global_batch_size + i`. Equal to online KD at k = V
  (tested); it serves only runs with the same seed, global batch size and masking (checked: the
  masking parameters and the sha256 of the step-0 masked batch are in the manifest), i.e. sweeps
  over students, learning rates and loss weights, not over seeds.

Layout of a cache directory:
  manifest.json          teacher / tokenizer / data fingerprints, k, dtypes, T, rows, shards;
                         written first as a plan (`complete: false`), rewritten `complete: true`
                         at the end
  shard-00000.arrow ...  Arrow IPC files (pyarrow), one record batch each: `row` int64 and per row
                         fixed-size lists `topk_values [T*k]` (uint16 bits of bf16/fp16 or
                         float32),
                         `topk_ids [T*k]` int32, `logz [T]` float32, `hidden [T*H]` (optional),
                         and per `manifest['layers']` entry (stored in `hidden_dtype`):
                         `hidden_states_i [T*H]` (i = 0 embeddings, i = layer i's output),
                         `attentions_l` / `attention_scores_l [h*T*T]`, `values_l [h*T*d]`
  shard-00000.arrow.sha256  the shard's sha256 (`sha256sum` line), written by its host after it
  SHA256SUMS             every shard and the manifest (`storage/integrity.py`), written last
Shard s holds cache positions [s*R, (s+1)*R) of the manifest's `rows` (indices into the packed
data; for a 'masked' cache, sample indices) and is written by host `s % process_count` to a
temporary file, then renamed: a killed build rerun with the same command skips finished shards
and gives a bit-identical cache. `TeacherCache` checks `SHA256SUMS` before it maps a shard (a
verified file is remembered by size, inode, mtime and ctime, so an unchanged cache is read once),
so a truncated or altered shard is refused, naming the file and the rebuild, not trained on.
"""

import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import ml_dtypes
import numpy as np
import pyarrow as pa

from flaxdistil.objectives import cached_teacher
from flaxdistil.storage import atomic
from flaxdistil.storage import integrity

FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
_DTYPES = {'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16, 'float32': np.float32}
# Fields that must match for a cache to serve a run (or for a build to resume into a directory).
IDENTITY_KEYS = ('data_fingerprint', 'teacher_fingerprint', 'tokenizer', 'max_seq_length')
# Intermediate `bert.ModelOutput` fields a cache can hold, by teacher index.
LAYER_FIELDS = ('hidden_states', 'attentions', 'attention_scores', 'values')


def needed_layers(inter, num_teacher_layers: int, extra_hidden=()) -> dict[str, list[int]]:
  """`ModelOutput` field -> sorted teacher indices an intermediate objective reads.

  Args:
    inter: `objective.LayerTerms` (`(IntermediateWeights, layer_map)`) or None
      (`Objective.inter`).
    num_teacher_layers: L.
    extra_hidden: more `hidden_states` indices to store (e.g. all of them for sweeps over
      student depth / layer maps); negative counts from the end.
  Returns:
    e.g. `{'hidden_states': [0, 2, 4], 'values': [3]}`: `hidden_states` indices are 0 =
    embeddings, i = output of layer i (as `ModelOutput.hidden_states`); the other fields are 0-based
    layers. Fields nothing reads are absent.
  """
  n = num_teacher_layers
  out = {f: set() for f in LAYER_FIELDS}
  out['hidden_states'].update(int(i) % (n + 1) for i in extra_hidden)
  if inter:
    w, layer_map = inter
    if w.alpha_emb:
      out['hidden_states'].add(0)
    if w.alpha_hidden:
      out['hidden_states'].update(1 + int(m) for m in layer_map)
    if w.alpha_attn_score:
      out['attention_scores'].update(int(m) for m in layer_map)
    if w.alpha_attn_kl:
      out['attentions'].add(w.relation_teacher_layer % n)
    if w.alpha_value_kl:
      out['values'].add(w.relation_teacher_layer % n)
  return {f: sorted(v) for f, v in out.items() if v}


def stored_layers(inter, num_teacher_layers: int, extra_hidden=(), hidden_dtype: str | None = None
                  ) -> dict[str, list[int]]:
  """The `layers` entry of a cache's manifest: `needed_layers` less the last hidden state, which
  is the `hidden` column when hidden states are stored (`hidden_dtype`).

  Args:
    inter: as `needed_layers`.
    num_teacher_layers: L.
    extra_hidden: as `needed_layers` (`teacher.cache_hidden_layers`).
    hidden_dtype: `teacher.cache_hidden_dtype` ('' or None: no hidden states stored).

  Returns:
    `{field: sorted indices}`, fields without indices left out.
  """
  layers = needed_layers(inter, num_teacher_layers, extra_hidden)
  if hidden_dtype and num_teacher_layers in layers.get('hidden_states', ()):
    layers['hidden_states'].remove(num_teacher_layers)
  return {f: v for f, v in layers.items() if v}


def planned_manifest(config, teacher_config: dict, vocab_size: int, inter) -> dict:
  """The shape fields of the manifest `cache_teacher.build` writes for `config`.

  For shapes before the cache exists (an ahead-of-time compile of an offline run).

  Args:
    config: the run's ConfigDict (`teacher.cache_*`, `data.max_seq_length`).
    teacher_config: the teacher's `ModelConfig` fields as a dict (`hidden_size`,
      `num_attention_heads`, `num_hidden_layers`).
    vocab_size: the teacher's vocabulary (k when `teacher.cache_top_k` is 0).
    inter: the objective's `LayerTerms`, or None.

  Returns:
    `{'top_k', 'values_dtype', 'hidden_dtype', 'hidden_size', 'teacher_config', 'layers',
    'max_seq_length'}`.
  """
  tc = config.teacher
  return {'top_k': int(tc.cache_top_k) or vocab_size, 'values_dtype': tc.cache_values_dtype,
          'hidden_dtype': tc.cache_hidden_dtype or None,
          'hidden_size': teacher_config['hidden_size'], 'teacher_config': dict(teacher_config),
          'layers': stored_layers(inter, teacher_config['num_hidden_layers'],
                                  tuple(tc.cache_hidden_layers), tc.cache_hidden_dtype),
          'max_seq_length': int(config.data.max_seq_length)}


def feature_spec(manifest: dict, top_k: int | None = None, hidden: bool = False,
                 logz: bool = False, layers: dict | None = None) -> dict[str, tuple]:
  """Shapes and dtypes of the batch entries `TeacherCache(...).features(rows)` returns.

  Args:
    manifest: a cache's manifest (or `planned_manifest`).
    top_k / hidden / logz / layers: as `TeacherCache`.

  Returns:
    `{batch key: (per-row shape, numpy dtype)}`: `teacher_topk_values` / `teacher_topk_ids`
    `(T, k)`, `teacher_logz` `(T,)`, `teacher_hidden` `(T, H)`, `teacher_{field}_{i}` in the
    `ModelOutput` layout.
  """
  m = manifest
  t, k = m['max_seq_length'], top_k or m['top_k']
  out = {'teacher_topk_values': ((t, k), np.dtype(storage_dtype(m['values_dtype']))),
         'teacher_topk_ids': ((t, k), np.dtype(np.int32))}
  if logz:
    out['teacher_logz'] = ((t,), np.dtype(np.float32))
  hidden_dtype = np.dtype(storage_dtype(m['hidden_dtype'])) if m['hidden_dtype'] else None
  if hidden:
    out['teacher_hidden'] = ((t, m['hidden_size']), hidden_dtype)
  for f, idx in (layers or {}).items():
    for i in idx:
      out[cached_teacher.cached_layer_key(f, i)] = (_layer_shape(f, m['teacher_config'], t),
                                                    hidden_dtype)
  return out


def _layer_columns(layers: dict, num_teacher_layers: int, last_hidden: bool) -> dict:
  """(field, index) -> column name; the last hidden state is the `hidden` column when stored."""
  cols = {}
  for f, idx in layers.items():
    for i in idx:
      last = f == 'hidden_states' and i == num_teacher_layers and last_hidden
      cols[(f, i)] = 'hidden' if last else f'{f}_{i}'
  return cols


def _layer_shape(field: str, cfg: dict, t: int) -> tuple:
  """Per-row shape of a stored intermediate output (`ModelOutput` layout without the batch)."""
  h, heads = cfg['hidden_size'], cfg['num_attention_heads']
  return {'hidden_states': (t, h), 'attentions': (heads, t, t), 'attention_scores': (heads, t, t),
          'values': (heads, t, h // heads)}[field]


# ----------------------------------------------------------------------------- fingerprints

def data_fingerprint(packed) -> str:
  """Fingerprint of the packed training data.

  Args:
    packed: a `corpus.PackedDataset` or an `[N, T]` array.

  Returns:
    `packed.fingerprint` if it has one, else the first 32 hex chars of the sha256 of its shape,
    dtype and bytes (~0.1 s per 50 MB).
  """
  fp = getattr(packed, 'fingerprint', None)
  if fp:
    return str(fp)
  a = np.ascontiguousarray(packed)
  h = hashlib.sha256(f'{a.shape}{a.dtype}'.encode())
  h.update(memoryview(a).cast('B'))
  return h.hexdigest()[:32]


def params_fingerprint(params) -> str:
  """The teacher's identity: 32 hex chars of the sha256 of every leaf's path, shape, dtype, bytes.

  Leaves are visited in sorted path order, so the dict order does not matter; device arrays are
  copied to the host.
  """
  h = hashlib.sha256()
  for path, x in sorted(jax.tree_util.tree_leaves_with_path(params),
                        key=lambda kv: jax.tree_util.keystr(kv[0])):
    x = np.ascontiguousarray(np.asarray(x))
    h.update(f'{jax.tree_util.keystr(path)}{x.shape}{x.dtype}'.encode())
    h.update(memoryview(x).cast('B'))
  return h.hexdigest()[:32]


# ----------------------------------------------------------------------------- shard files

def storage_dtype(name: str):
  """The numpy dtype of a cache dtype name.

  Args:
    name: 'bfloat16', 'float16' or 'float32'.

  Returns:
    `ml_dtypes.bfloat16`, `np.float16` or `np.float32`.

  Raises:
    ValueError: any other name.
  """
  if name not in _DTYPES:
    raise ValueError(f'cache dtype {name!r}: use one of {sorted(_DTYPES)}.')
  return _DTYPES[name]


def _to_storage(x: np.ndarray) -> np.ndarray:
  """16-bit floats as their uint16 bits (Arrow has no bfloat16); others unchanged."""
  return x.view(np.uint16) if x.dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)) else x


def _list_column(x: np.ndarray) -> pa.FixedSizeListArray:
  flat = _to_storage(np.ascontiguousarray(x)).reshape(len(x), -1)
  return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])


def write_shard(path: str, arrays: dict[str, np.ndarray]) -> int:
  """Atomically writes one shard as an Arrow IPC file (`storage.atomic.atomic_file`), then its
  sha256 beside it (`<path>.sha256`, a `sha256sum` line; `SHA256SUMS` is made of these).

  Args:
    path: the shard's file (`shard_name`).
    arrays: `row [R]` int64 and per-row arrays `[R, ...]` (`topk_values`, `topk_ids`, `logz`,
      `hidden`, layer columns). 1-D arrays become plain columns, the others fixed-size list
      columns of the flattened row; 16-bit floats are stored as their uint16 bits.

  Returns:
    The file's size in bytes.
  """
  cols = {k: pa.array(v) if v.ndim == 1 else _list_column(v) for k, v in arrays.items()}
  table = pa.table(cols)
  with atomic.atomic_file(path) as f, pa.ipc.new_file(f, table.schema) as w:
    w.write_table(table)
  with atomic.atomic_file(path + '.sha256', 'w') as f:
    f.write(f'{integrity.sha256_file(path)}  {os.path.basename(path)}\n')
  return os.path.getsize(path)


def shard_sha256(directory: str, s: int) -> str:
  """The sha256 of shard `s`: from its `.sha256` file if there is one, else hashed now."""
  try:
    with open(os.path.join(directory, shard_name(s) + '.sha256')) as f:
      digest = f.read().split()[0]
    if len(digest) == 64:
      return digest
  except (OSError, IndexError):
    pass
  return integrity.sha256_file(os.path.join(directory, shard_name(s)))


def complete(directory: str, manifest: dict) -> bool:
  """True when a build in `directory` has nothing left to do: `manifest` is complete, every
  shard exists and so does the `SHA256SUMS` it names (if it names one)."""
  if not manifest.get('complete'):
    return False
  shards = all(os.path.exists(os.path.join(directory, shard_name(s)))
               for s in range(manifest['num_shards']))
  sums = manifest.get('checksums')
  return shards and (not sums or os.path.exists(os.path.join(directory, sums)))


def cache_fix(directory: str):
  """`name -> fix` of a damaged cache file: what to delete so that the build command redoes it."""
  directory = os.path.abspath(directory)
  sums = os.path.join(directory, integrity.SUMS_FILE)

  def fix(name: str) -> str:
    build = (f'rerun the command that built it (python -m flaxdistil.cache_teacher --config ... '
             f'--out {directory})')
    if name.startswith('shard-'):
      shard = os.path.join(directory, name)
      return (f'Delete it (rm {shard} {shard}.sha256 {sums}) and {build}: only that shard is '
              'computed again.')
    if name == integrity.SUMS_FILE:
      return f'{build[0].upper()}{build[1:]}: the checksums are written again.'
    return (f'Delete it (rm {os.path.join(directory, name)} {sums}) and {build}: the manifest and '
            'checksums are written again, the shards are kept.')
  return fix


def read_shard(path: str, shapes: dict[str, tuple], dtypes: dict[str, Any]) -> dict[str, np.ndarray]:
  """Memory-maps a shard written by `write_shard`.

  Args:
    path: the shard's file.
    shapes: column -> per-row shape, e.g. `{'topk_ids': (T, k)}`.
    dtypes: column -> numpy dtype to view the stored values as (bfloat16 from uint16 bits).

  Returns:
    `row [R]` int64 plus, for each column of `shapes`, zero-copy numpy views
    `[R, *shapes[k]]` of dtype `dtypes[k]`.
  """
  table = pa.ipc.open_file(pa.memory_map(path, 'r')).read_all()
  out = {'row': table.column('row').to_numpy()}
  for k, shape in shapes.items():
    col = table.column(k).combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    out[k] = flat.view(dtypes[k]).reshape((len(col),) + tuple(shape))
  return out


def shard_name(s: int) -> str:
  """File name of shard `s`: `shard-00000.arrow`, ..."""
  return f'shard-{s:05d}.arrow'


# ----------------------------------------------------------------------------- reader

class TeacherCache:
  """A complete cache directory, memory-mapped; `features(rows)` gives a batch's targets.

  Args:
    directory: a directory written by `cache_teacher.build` (`python -m flaxdistil.cache_teacher`).
    top_k: k to serve, <= the stored k (the stored top-k is sorted, so its first k entries are
      the top-k); None or 0 = the stored k.
    hidden: serve `teacher_hidden` (needs a cache built with hidden states).
    logz: serve `teacher_logz` (for `tail_bucket`).
    layers: intermediate outputs to serve, `needed_layers(...)` of the run (as
      `teacher_{field}_{i}` batch entries in the `ModelOutput` layout).

  Raises:
    CorruptFileError: a shard or the manifest fails `SHA256SUMS` (truncated, altered, missing);
      the message names the file and what to delete before rerunning the build.
    ValueError: no/incomplete manifest, another format version, missing shards, k too large,
      hidden states or a needed intermediate layer not stored.
  """

  def __init__(self, directory: str, top_k: int | None = None, hidden: bool = False,
               logz: bool = False, layers: dict | None = None):
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
      raise ValueError(f'teacher.cache={directory!r} has no {MANIFEST}; build it with '
                       f'`python -m flaxdistil.cache_teacher --config ... --out {directory}`.')
    fix = cache_fix(directory)
    if os.path.exists(os.path.join(directory, integrity.SUMS_FILE)):
      integrity.verify(directory, fix, stamps=True, what='teacher cache file')
    try:
      with open(path) as f:
        self.manifest = m = json.load(f)
    except ValueError:
      raise integrity.CorruptFileError(os.path.abspath(path), 'is not valid JSON',
                                       fix(MANIFEST)) from None
    if m.get('complete') and m.get('checksums') and not os.path.exists(
        os.path.join(directory, m['checksums'])):
      integrity.verify(directory, fix)  # raises: SHA256SUMS missing
    if m.get('complete') and not m.get('checksums'):
      logging.warning('teacher.cache=%r was built before caches had checksums: it cannot be '
                      'verified; rebuild it to have it checked.', directory)
    if not m.get('complete'):
      raise ValueError(f'teacher.cache={directory!r} is an unfinished build; rerun the same '
                       '`python -m flaxdistil.cache_teacher` command to finish it.')
    if m['format_version'] != FORMAT_VERSION:
      raise ValueError(f'teacher.cache={directory!r} has format {m["format_version"]}, this code '
                       f'reads {FORMAT_VERSION}; rebuild the cache.')
    self.top_k = top_k or m['top_k']
    if self.top_k > m['top_k']:
      raise ValueError(f'teacher.cache_top_k={self.top_k} exceeds the k={m["top_k"]} stored in '
                       f'{directory!r}; use k <= {m["top_k"]} or rebuild with a larger k.')
    if hidden and not m['hidden_dtype']:
      raise ValueError(f'distill.alpha_cos needs the teacher\'s last hidden states but '
                       f'{directory!r} was built without them; rebuild with '
                       'teacher.cache_hidden_dtype="bfloat16" or set distill.alpha_cos=0.')
    t, k, h = m['max_seq_length'], m['top_k'], m['hidden_size']
    shapes = {'topk_values': (t, k), 'topk_ids': (t, k), 'logz': (t,)}
    dtypes = {'topk_values': storage_dtype(m['values_dtype']), 'topk_ids': np.int32, 'logz': np.float32}
    if m['hidden_dtype']:
      shapes['hidden'], dtypes['hidden'] = (t, h), storage_dtype(m['hidden_dtype'])
    n_layers = m['teacher_config']['num_hidden_layers']
    stored = _layer_columns(m.get('layers') or {}, n_layers, bool(m['hidden_dtype']))
    if m['hidden_dtype']:
      stored[('hidden_states', n_layers)] = 'hidden'
    want = _layer_columns(layers or {}, n_layers, bool(m['hidden_dtype']))
    missing = [f'{f}[{i}]' for f, i in want if (f, i) not in stored]
    if missing:
      have = sorted(f'{f}[{i}]' for f, i in stored)
      raise ValueError(f'this run\'s intermediate terms read teacher {", ".join(missing)} but '
                       f'teacher.cache={directory!r} stores only {have or "none"}; rebuild the '
                       'cache with this config (python -m flaxdistil.cache_teacher stores what '
                       'its distill alphas and layer_map need; teacher.cache_hidden_layers adds '
                       'more hidden_states), or change the distill alphas / layer_map.')
    for (f, i), col in stored.items():
      if col != 'hidden':
        shapes[col] = _layer_shape(f, m['teacher_config'], t)
        dtypes[col] = storage_dtype(m['hidden_dtype'])
    self._layer_names = [(stored[key], cached_teacher.cached_layer_key(*key)) for key in want]
    self._hidden, self._logz = hidden, logz
    self.directory, self.rows_per_shard = directory, m['rows_per_shard']
    self._shards = []
    for s in range(m['num_shards']):
      p = os.path.join(directory, shard_name(s))
      if not os.path.exists(p):
        raise ValueError(f'teacher.cache={directory!r} lacks {shard_name(s)}; rebuild the cache.')
      self._shards.append(read_shard(p, shapes, dtypes))
    rows = np.asarray(m['rows'], np.int64)
    self.by_sample = m.get('index') == 'sample'  # a masked-input cache: index = step * B + i
    self._pos = np.full(int(rows.max()) + 1 if self.by_sample else m['data_shape'][0], -1, np.int64)
    self._pos[rows] = np.arange(len(rows))

  def check(self, expected: dict) -> None:
    """Refuses a cache made for other data, another teacher or tokenizer, or another length.

    Args:
      expected: the run's values of `IDENTITY_KEYS` (`identity(...)`).

    Raises:
      ValueError: a field differs (names every mismatching field and the fix).
    """
    bad = [f'{k}: cache has {self.manifest.get(k)!r}, this run has {expected[k]!r}'
           for k in IDENTITY_KEYS if self.manifest.get(k) != expected[k]]
    if bad:
      raise ValueError(f'teacher.cache={self.directory!r} was built for another run ('
                       + '; '.join(bad) + '). Build a cache for this config with '
                       '`python -m flaxdistil.cache_teacher --config ... --out NEW_DIR`.')

  def features(self, rows: np.ndarray, samples: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Cached targets of a batch's rows (the `row_features` hook of `BatchIterator`).

    Args:
      rows: `[B]` indices into the packed data (read by an 'original' cache).
      samples: `[B]` sample indices `step * global_batch_size + i`, as `BatchIterator` passes
        them (read by a masked-input cache, `index: sample`).

    Returns:
      `teacher_topk_values [B, T, k]` (stored dtype), `teacher_topk_ids [B, T, k]` int32, and if
      requested `teacher_logz [B, T]` float32, `teacher_hidden [B, T, H]`, `teacher_{field}_{i}`
      (`[B, T, H]` hidden states, `[B, h, T, T]` attentions / attention_scores, `[B, h, T, d]`
      values; stored dtype). New arrays, not views of the memory map.

    Raises:
      ValueError: a row (or sample) that is not in the cache, or a masked-input cache read
        without `samples`.
    """
    if self.by_sample and samples is None:
      raise ValueError(f'teacher.cache={self.directory!r} holds the teacher on masked sequences; '
                       'it is read by sample index (features(rows, samples)).')
    idx = np.asarray(samples if self.by_sample else rows, np.int64)
    pos = np.where(idx < len(self._pos), self._pos[np.minimum(idx, len(self._pos) - 1)], -1)
    if (pos < 0).any():
      what = 'sample' if self.by_sample else 'packed row'
      raise ValueError(f'{what} {int(idx[pos < 0][0])} is not in teacher.cache='
                       f'{self.directory!r} ({len(self.manifest["rows"])} {what}s cached): the run '
                       f'reads more {what}s than were cached; rebuild with a larger --num_rows '
                       '(or num_train_steps).')
    names = [('topk_values', 'teacher_topk_values'), ('topk_ids', 'teacher_topk_ids')]
    if self._logz:
      names.append(('logz', 'teacher_logz'))
    if self._hidden:
      names.append(('hidden', 'teacher_hidden'))
    names += self._layer_names
    shard, off = pos // self.rows_per_shard, pos % self.rows_per_shard
    out, read = {}, {}
    for key, name in names:
      if key in read:  # one column under two names (the last hidden state: alpha_cos and a layer)
        out[name] = read[key]
        continue
      first = self._shards[0][key]
      cut = (slice(None), slice(None), slice(0, self.top_k)) if key.startswith('topk') else ()
      shape = first[(slice(0, 1),) + cut[1:]].shape[1:]
      arr = np.empty((len(pos),) + shape, first.dtype)
      for s in np.unique(shard):
        sel = shard == s
        arr[sel] = self._shards[s][key][off[sel]][cut]
      out[name] = read[key] = arr
    return out


# ----------------------------------------------------------------------------- identity

def identity(teacher_params, packed, tokenizer_fp: str, max_seq_length: int) -> dict:
  """The `IDENTITY_KEYS` of a run: what a cache must have been built for.

  Args:
    teacher_params: the teacher's params (`params_fingerprint`).
    packed: the packed training data (`data_fingerprint`).
    tokenizer_fp: the tokenizer's fingerprint (the run's `fingerprint['tokenizer_vocab']`).
    max_seq_length: T.

  Returns:
    `{'data_fingerprint', 'teacher_fingerprint', 'tokenizer', 'max_seq_length'}` -> value.
  """
  return {'data_fingerprint': data_fingerprint(packed),
          'teacher_fingerprint': params_fingerprint(teacher_params),
          'tokenizer': tokenizer_fp, 'max_seq_length': int(max_seq_length)}


def masking_identity(config, first_input_ids: np.ndarray) -> dict:
  """What a masked-input cache must share with a run.

  Args:
    config: the run's config (`seed`, `data.global_batch_size`, `distill.mlm_probability`,
      `distill.mlm_smoothing`).
    first_input_ids: the run's step-0 masked `input_ids [B, T]`.

  Returns:
    The masking's parameters and `first_batch_sha256`, 32 hex chars of the sha256 of
    `first_input_ids` as int32 (catches any other change of the masking).
  """
  d = config.distill
  return {'seed': int(config.seed), 'global_batch_size': int(config.data.global_batch_size),
          'mlm_probability': float(d.mlm_probability), 'mlm_smoothing': float(d.mlm_smoothing),
          'first_batch_sha256': hashlib.sha256(
              np.ascontiguousarray(first_input_ids, np.int32).tobytes()).hexdigest()[:32]}
