"""The batches of a run: packed masked text (MLM), GLUE examples, and a teacher cache's targets.

`mlm_batches` / `task_batches` return `(train_batches(start_step), eval_batches())` factories over
the data the config names (tokenised once into the shared token cache, `data/corpus.py`);
`open_teacher_cache` checks that a `teacher.cache` was built for this run and returns the
`row_features` hook that adds its targets to every batch. Errors are `ConfigError`s naming the fix.
"""

import os

from absl import logging
import jax
import numpy as np

from flaxdistil.data import corpus
from flaxdistil.data import glue
from flaxdistil.data import input_pipeline
from flaxdistil.data import masking
from flaxdistil.data import teacher_cache
from flaxdistil.storage.integrity import CorruptFileError
from flaxdistil.training import sharding
from flaxdistil.training.errors import ConfigError


def files_id(files) -> list:
  """`[[basename, size in bytes], ...]` of the existing `files` (the fingerprint's data part)."""
  return [[os.path.basename(f), os.path.getsize(f)] for f in files if os.path.exists(f)]


def eval_batch_size(d, mesh, rules) -> int:
  """`data.eval_batch_size` rounded down to a multiple of the batch shards.

  Args:
    d: the config's `data` group.
    mesh: the run's mesh.
    rules: its logical axis rules.

  Returns:
    Rows per eval batch; at least the number of batch shards (one row each).
  """
  shards = sharding.num_batch_shards(mesh, rules)
  return max(shards, d.eval_batch_size - d.eval_batch_size % shards)


def mlm_batches(config, tokenizer, scfg, train_files, eval_files, mesh, rules):
  """The batch factories of packed, masked text (MLM distillation), and the packed rows.

  Args:
    config: the run's ConfigDict (`data`, `distill.mlm_probability`/`mlm_smoothing`, `seed`).
    tokenizer: the run's tokenizer (special and [MASK] ids, vocabulary size).
    scfg: the student's config (`vocab_size` of the smoothed masking distribution).
    train_files: training text files (ignored with `data.dataset`).
    eval_files: held-out text files (ignored with `data.dataset_eval_split`).
    mesh: the run's mesh (eval batches are a multiple of its batch shards).
    rules: its logical axis rules.

  Returns:
    `(train_batches, eval_batches, packed)`: `train_batches(start_step, row_features=None)` ->
    an `input_pipeline.BatchIterator` of host-local batches (`streaming_batches` with
    `data.streaming`); `eval_batches()` -> fixed global eval batches (`[]` without eval data);
    `packed`: the packed training rows (`corpus.PackedDataset`, `[N, max_seq_length]` int32),
    None when streaming.

  Raises:
    ConfigError: the data cannot be read or tokenised (missing files, an unsupported extension
      or non-UTF-8 file, a missing text column, an unknown dataset or split, no tokens).
    CorruptFileError: a file of the token cache fails its checksum (`corpus.verify_cache`).
    DiskFullError: no space left for the token cache.
  """
  d, gbs, vocab_size = config.data, config.data.global_batch_size, len(tokenizer)
  cache_dir = d.cache_dir or corpus.default_cache_dir()
  source = dict(dataset=d.dataset, dataset_split=d.dataset_split, text_column=d.text_column)
  try:
    # Every host builds-or-waits on the same key (flock); the first one tokenises, the rest map it.
    packed = None if d.streaming else input_pipeline.load_packed(
        train_files, tokenizer, d.max_seq_length, cache_dir=cache_dir, num_proc=d.num_proc, **source)
    packed_eval = None
    if d.dataset and d.dataset_eval_split:
      packed_eval = input_pipeline.load_packed(
          (), tokenizer, d.max_seq_length, cache_dir=cache_dir, num_proc=d.num_proc,
          **dict(source, dataset_split=d.dataset_eval_split))
    elif eval_files:
      packed_eval = input_pipeline.load_packed(eval_files, tokenizer, d.max_seq_length,
                                               cache_dir=cache_dir, num_proc=d.num_proc,
                                               text_column=d.text_column)
  except CorruptFileError:
    raise  # not a config problem: a damaged cache file, named with its fix
  except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
    raise ConfigError(str(e)) from e
  special_ids = sorted(set(tokenizer.all_special_ids))
  mask_kwargs = dict(mask_token_id=tokenizer.mask_token_id, vocab_size=vocab_size,
                     special_token_ids=special_ids, mlm_probability=config.distill.mlm_probability)
  token_probs = None
  if config.distill.mlm_smoothing:
    token_probs = masking.token_probabilities(packed, scfg.vocab_size,
                                                     config.distill.mlm_smoothing, special_ids)
  logging.info('train: %s packed sequences of %d tokens; eval: %s',
               'streamed' if packed is None else len(packed), d.max_seq_length,
               None if packed_eval is None else len(packed_eval))

  def train_batches(start_step: int, row_features=None):
    """Host-local batches from `start_step` on; `row_features` as `BatchIterator`'s (unused
    when streaming)."""
    if d.streaming:  # position = step: resuming re-reads and skips start_step batches
      return input_pipeline.streaming_batches(
          train_files, tokenizer, d.max_seq_length, global_batch_size=gbs, seed=config.seed,
          start_position=start_step, process_index=jax.process_index(),
          process_count=jax.process_count(), mlm_probability=config.distill.mlm_probability,
          **source)
    return input_pipeline.BatchIterator(
        packed, global_batch_size=gbs, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        token_probs=token_probs, row_features=row_features, **mask_kwargs)

  def eval_batches():
    """The fixed global eval batches (`input_pipeline.eval_batches`), `[]` without eval data."""
    if packed_eval is None:
      return []
    return input_pipeline.eval_batches(packed_eval, eval_batch_size(d, mesh, rules),
                                       config.seed + 12345, d.eval_num_sequences or None,
                                       **mask_kwargs)

  return train_batches, eval_batches, packed


def open_teacher_cache(config, tparams, packed, tokenizer_fp: str, inter, num_teacher_layers,
                        train_batches):
  """Opens `teacher.cache` after checking it was built for this run.

  Args:
    config: the run's ConfigDict (`teacher.cache*`, `distill`, `data.max_seq_length`).
    tparams: the teacher's host params (their fingerprint must match the cache's).
    packed: the packed training rows (their fingerprint must match too).
    tokenizer_fp: the run's tokenizer fingerprint (`Run.fingerprint['tokenizer_vocab']`).
    inter: the objective's `LayerTerms`, or None (which intermediate outputs must be stored).
    num_teacher_layers: the teacher's depth.
    train_batches: the run's `train_batches` factory (a masked-input cache is checked
      against its step-0 batch).

  Returns:
    `(row_features, fingerprint entry)`: `TeacherCache.features`, the `BatchIterator` hook
    that adds the cached targets to each batch, and the `teacher_targets` entry of the run's
    fingerprint (cache and data fingerprints, k, tail bucket, teacher input).

  Raises:
    ConfigError: the cache is missing, unfinished or of another format, was built for another
      teacher / tokenizer / data / length, lacks what the objective reads (k, hidden states,
      layers), holds another masked stream, or stores logsumexp at another temperature.
    CorruptFileError: a file of the cache fails its checksum (`TeacherCache`).
  """
  t, d = config.teacher, config.distill  # streaming, task and alpha_mse: checked by validate
  try:
    cache = teacher_cache.TeacherCache(
        t.cache, top_k=t.cache_top_k, hidden=bool(d.alpha_cos), logz=t.cache_tail_bucket,
        layers=teacher_cache.needed_layers(inter, num_teacher_layers))
    cache.check(teacher_cache.identity(tparams, packed, tokenizer_fp, config.data.max_seq_length))
  except CorruptFileError:
    raise  # a damaged shard, named with its fix
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if cache.by_sample:  # the teacher saw this run's masked stream: the masking must be the same
    it = train_batches(0)
    it.close()
    want = teacher_cache.masking_identity(config, it.global_batch(0)['input_ids'])
    have = cache.manifest['masking']
    if want != have:
      diff = [f'{k}: cache {have.get(k)!r}, run {v!r}' for k, v in want.items() if have.get(k) != v]
      raise ConfigError(f'teacher.cache={t.cache!r} holds the teacher on another masked stream '
                        f'({"; ".join(diff)}); a masked-input cache serves only runs with its '
                        'seed, global_batch_size and masking. Rebuild it for this config, or use '
                        'a teacher.cache_teacher_input="original" cache.')
  if t.cache_tail_bucket and cache.manifest['temperature'] != d.temperature:
    raise ConfigError(f'teacher.cache_tail_bucket needs the teacher\'s logsumexp at '
                      f'T={d.temperature}, but {t.cache!r} stores it at '
                      f'T={cache.manifest["temperature"]}; rebuild the cache with this temperature '
                      'or set teacher.cache_tail_bucket=False.')
  logging.info('teacher.cache %s: k=%d of %d stored (%s), %d rows', t.cache, cache.top_k,
               cache.manifest['top_k'], cache.manifest['values_dtype'],
               len(cache.manifest['rows']))
  return cache.features, {'cache': cache.manifest.get('teacher_fingerprint'),
                          'data': cache.manifest.get('data_fingerprint'),
                          'top_k': cache.top_k, 'tail_bucket': bool(t.cache_tail_bucket),
                          'teacher_input': cache.manifest.get('teacher_input')}


def task_batches(config, task, tokenizer, train_files, eval_files, mesh, rules):
  """The batch factories of a GLUE task's labelled TSV files.

  Args:
    config: the run's ConfigDict (`data`, `seed`).
    task: the `glue.GlueTask`.
    tokenizer: the run's tokenizer.
    train_files: `[train.tsv]` (one file, checked by `validate`).
    eval_files: `[dev.tsv]` or `[]`.
    mesh: the run's mesh (eval batches are a multiple of its batch shards).
    rules: its logical axis rules.

  Returns:
    `(train_batches, eval_batches)`: `train_batches(start_step)` -> a
    `glue.ClassificationBatches` of host-local batches; `eval_batches()` -> the whole dev split
    as fixed global batches (`[]` without one).

  Raises:
    ConfigError: a missing, unreadable or malformed TSV file.
  """
  d = config.data  # one train TSV, at most one eval TSV: checked by validate
  try:
    train = glue.load_split(train_files[0], task, tokenizer, d.max_seq_length)
    dev = glue.load_split(eval_files[0], task, tokenizer, d.max_seq_length) if eval_files else None
  except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
    raise ConfigError(str(e)) from e
  truncated = float(np.mean(train['attention_mask'][:, -1] == 1))
  logging.info('%s: %d train / %s eval examples of %d tokens (%.1f%% truncated)', task.name,
               len(train['labels']), None if dev is None else len(dev['labels']),
               d.max_seq_length, 100 * truncated)

  def train_batches(start_step: int):
    """Host-local shuffled batches from `start_step` on."""
    return glue.ClassificationBatches(
        train, global_batch_size=d.global_batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())

  def eval_batches():
    """The dev split as fixed global batches (`glue.eval_batches`), `[]` without one."""
    return [] if dev is None else glue.eval_batches(dev, eval_batch_size(d, mesh, rules))

  return train_batches, eval_batches
