"""flaxdistil.data.corpus: sharded parallel tokenisation == single-process packing, cache, reads;
checksums checked before a row is served, a damaged shard rebuilt alone, a full disk resumed."""
import json
import os
import threading

import datasets
import numpy as np
import pytest

from flaxdistil.data import corpus
from flaxdistil.data import documents
from flaxdistil.data import input_pipeline as ip
from flaxdistil.data import masking
from flaxdistil.data import synthetic
from flaxdistil.data import tokenization
from flaxdistil.storage import integrity
from flaxdistil.storage import space
from flaxdistil.training import setup

# the `tok` fixture's vocabulary and the shared helpers (tests/conftest.py)
from conftest import CLS
from conftest import MASK
from conftest import PAD
from conftest import SEP
from conftest import UNK
from conftest import WORDS
from conftest import flip_byte
from conftest import small_filesystem
from conftest import tiny_config
from test_documents import messy_text


def reference_rows(files, tok, max_seq_length):
  """The old single-process packing: datasets' paragraph reader over whole files, then windows."""
  docs = []
  for f in files:
    ds = datasets.load_dataset('text', data_files=[f], split='train', sample_by='paragraph',
                               streaming=True)
    docs += [r['text'] for r in ds]
  flat = corpus.concat_documents(corpus.tokenize_documents(docs, corpus.backend(tok)), SEP)[:-1]
  return corpus.wrap_windows(flat, max_seq_length, CLS, SEP, PAD)


@pytest.mark.slow
def test_parallel_shards_equal_single_process_packing(tok, tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  files = []
  for i in range(2):
    (tmp_path / f'c{i}.txt').write_bytes(messy_text(rng, 80).encode())
    files.append(str(tmp_path / f'c{i}.txt'))
  units = documents.file_units(files, unit_bytes=500)
  assert len(units) > 10
  serial = corpus.open_packed(units, tok, 13, cache_dir=str(tmp_path / 's'), num_proc=1)
  parallel = corpus.open_packed(units, tok, 13, cache_dir=str(tmp_path / 'p'), num_proc=2)
  assert parallel.manifest['num_proc'] == 2 and len(parallel.manifest['shards']) == len(units)
  expected = reference_rows(files, tok, 13)
  np.testing.assert_array_equal(np.asarray(serial), expected)
  np.testing.assert_array_equal(np.asarray(parallel), expected)
  assert serial.fingerprint == parallel.fingerprint
  whole = corpus.open_packed(documents.file_units(files), tok, 13, cache_dir=str(tmp_path / 'w'))
  np.testing.assert_array_equal(np.asarray(whole), expected)  # one unit per file: same rows
  assert whole.fingerprint == serial.fingerprint  # a content id: independent of the unit split
  assert corpus.cache_key(units, tok) != corpus.cache_key(documents.file_units(files[::-1]), tok)
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes('the caf\xe9 sat\n'.encode('latin-1'))
  calls = []
  real = corpus.tokenize_documents
  monkeypatch.setattr(corpus, 'tokenize_documents', lambda t, b: calls.append(1) or real(t, b))
  with pytest.raises(ValueError, match=r'latin1\.txt is not valid UTF-8.*offset 7'):
    corpus.open_packed(units + documents.file_units([str(bad)]), tok, 13, cache_dir=str(tmp_path / 'b'))
  assert not calls  # checked before any tokenisation
  nocol = tmp_path / 'nocol.jsonl'
  nocol.write_text('{"body": "the cat"}\n')
  with pytest.raises(ValueError, match='nocol.jsonl has no "text" column'):
    corpus.open_packed(units + documents.file_units([str(nocol)]), tok, 13,
                       cache_dir=str(tmp_path / 'b'), num_proc=2)  # raised in a worker
  # Shards hold uint16 ids (vocab < 65536); counts are those of the stream.
  stream = np.concatenate([np.load(os.path.join(parallel.directory, s['file']))
                           for s in parallel.manifest['shards']])
  assert stream.dtype == np.uint16
  np.testing.assert_array_equal(parallel.token_counts(), np.bincount(stream, minlength=len(tok)))


def test_packed_dataset_indexing_and_fingerprint(tok, tmp_path):
  f = tmp_path / 'a.txt'
  f.write_text(messy_text(np.random.default_rng(2), 50))
  units = documents.file_units([str(f)], unit_bytes=300)  # windows straddle shard boundaries
  p = corpus.open_packed(units, tok, 10, cache_dir=str(tmp_path))
  ref = reference_rows([str(f)], tok, 10)
  assert p.shape == ref.shape and len(p) == len(ref) and p.ndim == 2 and p.dtype == np.int32
  np.testing.assert_array_equal(p[3], ref[3])
  np.testing.assert_array_equal(p[-1], ref[-1])
  np.testing.assert_array_equal(p[5:17:3], ref[5:17:3])
  rows = np.random.default_rng(0).integers(0, len(p), (4, 6))
  np.testing.assert_array_equal(p[rows], ref[rows])
  with pytest.raises(IndexError):
    p[len(p)]
  again = corpus.PackedDataset(p.directory, 10, cls_id=CLS, sep_id=SEP, pad_id=PAD)
  other_length = corpus.PackedDataset(p.directory, 12, cls_id=CLS, sep_id=SEP, pad_id=PAD)
  assert again.fingerprint == p.fingerprint != other_length.fingerprint
  np.testing.assert_array_equal(np.asarray(other_length), reference_rows([str(f)], tok, 12))


def test_interrupted_build_resumes_from_finished_shards(tok, tmp_path, monkeypatch):
  f = tmp_path / 'r.txt'
  f.write_text(messy_text(np.random.default_rng(3), 40))
  units = documents.file_units([str(f)], unit_bytes=400)
  calls = []
  real = corpus.tokenize_documents
  monkeypatch.setattr(corpus, 'tokenize_documents', lambda t, b: calls.append(1) or real(t, b))
  first = corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'c'), num_proc=1)
  n_all = len(calls)
  # Simulate a kill after some shards: no manifest, the last shards unfinished.
  os.remove(os.path.join(first.directory, 'manifest.json'))
  for s in first.manifest['shards'][-2:]:
    os.remove(os.path.join(first.directory, s['file'][:-4] + '.json'))
  calls.clear()
  again = corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'c'), num_proc=1)
  assert 0 < len(calls) < n_all  # only the two unfinished shards were tokenised again
  assert again.fingerprint == first.fingerprint
  np.testing.assert_array_equal(np.asarray(again), reference_rows([str(f)], tok, 16))
  calls.clear()
  corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'c'))
  assert not calls  # cache hit


def test_a_damaged_shard_is_refused_before_any_row_and_the_fix_rebuilds_only_it(tok, tmp_path,
                                                                               monkeypatch):
  f = tmp_path / 'v.txt'
  f.write_text(messy_text(np.random.default_rng(5), 40))
  units = documents.file_units([str(f)], unit_bytes=400)
  p = corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'c'), num_proc=1)
  d = p.directory
  assert p.manifest['checksums'] == integrity.SUMS_FILE
  assert sorted(integrity.read_sums(d)) == sorted(
      [s['file'] for s in p.manifest['shards']] + ['counts.npy', 'manifest.json'])
  # Opening an unchanged cache again hashes nothing (stamps): the cost of a verified re-open.
  assert integrity.verify(d, 'x', stamps=True).hashed_bytes == 0
  shard = os.path.join(d, p.manifest['shards'][1]['file'])
  flip_byte(shard, -3)  # one token near the end
  with pytest.raises(integrity.CorruptFileError) as e:
    corpus.PackedDataset(d, 16, cls_id=CLS, sep_id=SEP, pad_id=PAD)
  base = shard[:-4]
  assert str(e.value).startswith(f'{shard} is corrupt: this token cache file (')
  assert (f'(rm {base}.npy {base}.json {base}.counts.npy {d}/manifest.json), or rm -r {d} to '
          'rebuild all.') in str(e.value)
  # Through the input pipeline the error keeps its type (not a ConfigError).
  with pytest.raises(integrity.CorruptFileError):
    corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'c'), num_proc=1)
  for name in (f'{base}.npy', f'{base}.json', f'{base}.counts.npy', f'{d}/manifest.json'):
    os.remove(name)  # the fix the message gives
  calls = []
  real = corpus.tokenize_documents
  monkeypatch.setattr(corpus, 'tokenize_documents', lambda t, b: calls.append(1) or real(t, b))
  again = corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'c'), num_proc=1)
  assert len(calls) == 1  # that shard alone
  np.testing.assert_array_equal(np.asarray(again), reference_rows([str(f)], tok, 16))
  with open(shard, 'r+b') as fh:  # truncated
    fh.truncate(os.path.getsize(shard) - 4)
  with pytest.raises(integrity.CorruptFileError, match='is corrupt'):
    corpus.PackedDataset(d, 16, cls_id=CLS, sep_id=SEP, pad_id=PAD)


def test_a_cache_built_before_checksums_is_checked_against_its_manifest(tok, tmp_path):
  f = tmp_path / 'o.txt'
  f.write_text(messy_text(np.random.default_rng(6), 20))
  p = corpus.open_packed(documents.file_units([str(f)]), tok, 16, cache_dir=str(tmp_path / 'c'))
  d = p.directory
  manifest = json.load(open(os.path.join(d, 'manifest.json')))
  del manifest['checksums']  # as an older version wrote it: no SHA256SUMS
  json.dump(manifest, open(os.path.join(d, 'manifest.json'), 'w'))
  os.remove(os.path.join(d, integrity.SUMS_FILE))
  np.testing.assert_array_equal(
      np.asarray(corpus.PackedDataset(d, 16, cls_id=CLS, sep_id=SEP, pad_id=PAD)), np.asarray(p))
  flip_byte(os.path.join(d, 'shard-00000.npy'), -3)
  with pytest.raises(integrity.CorruptFileError, match='do not match the sha256 .* recorded in '
                     'manifest.json'):
    corpus.PackedDataset(d, 16, cls_id=CLS, sep_id=SEP, pad_id=PAD)


def test_a_build_that_finds_the_disk_full_keeps_its_shards_and_resumes(tok, tmp_path):
  f = tmp_path / 'big.txt'
  f.write_text(messy_text(np.random.default_rng(7), 400))
  units = documents.file_units([str(f)], unit_bytes=4000)
  assert len(units) > 4
  ref = corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'ref'), num_proc=1)
  shard_pages = -(-os.path.getsize(os.path.join(ref.directory, 'shard-00000.npy')) // 4096)
  with small_filesystem(tmp_path / 'fs', (4 + 3 * shard_pages) * 4096) as fs:  # 1-2 shards fit
    with pytest.raises(space.DiskFullError) as e:
      corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'fs'), num_proc=1)
    assert str(e.value).startswith('No space left on device writing the token cache tokens-')
    assert e.value.needed > 0
    built = sorted((tmp_path / 'fs').glob('tokens-*/shard-*.json'))
    assert 0 < len(built) < len(units)  # finished shards kept, no manifest
    assert not list((tmp_path / 'fs').glob('tokens-*/manifest.json'))
    fs.resize(64 << 20)
    again = corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'fs'), num_proc=1)
    assert again.manifest['tokens_sha256'] == ref.manifest['tokens_sha256']
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ref))


def test_concurrent_builders_share_one_build(tok, tmp_path, monkeypatch):
  f = tmp_path / 'k.txt'
  f.write_text(messy_text(np.random.default_rng(4), 30))
  units = documents.file_units([str(f)], unit_bytes=300)
  calls = []
  real = corpus.tokenize_documents
  monkeypatch.setattr(corpus, 'tokenize_documents', lambda t, b: calls.append(1) or real(t, b))
  out = [None] * 3
  threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, corpus.open_packed(
      units, tok, 16, cache_dir=str(tmp_path / 'c'), num_proc=1))) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  one_build = len(calls)
  assert len({p.fingerprint for p in out}) == 1
  assert len([d for d in os.listdir(tmp_path / 'c') if not d.endswith('.lock')]) == 1
  assert not [x for x in os.listdir(out[0].directory) if x.startswith('.tmp')]
  single = corpus.open_packed(units, tok, 16, cache_dir=str(tmp_path / 'solo'), num_proc=1)
  assert one_build > 0 and len(calls) == 2 * one_build  # the three builders tokenised once
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(single))


def _hub_repo(root, docs_train, docs_valid, column='content'):
  """A directory laid out like a hub dataset repo: data/{split}-0000i-of-0000n.parquet."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  (root / 'data').mkdir(parents=True)
  halves = [docs_train[:len(docs_train) // 2], docs_train[len(docs_train) // 2:]]
  for i, part in enumerate(halves):
    pq.write_table(pa.table({column: part, 'id': list(range(len(part)))}),
                   root / 'data' / f'train-0000{i}-of-00002.parquet')
  pq.write_table(pa.table({column: docs_valid, 'id': list(range(len(docs_valid)))}),
                 root / 'data' / 'validation-00000-of-00001.parquet')
  (root / 'README.md').write_text('---\nlicense: mit\n---\n# toy corpus\n')
  return str(root)


@pytest.mark.slow
def test_hub_style_dataset_directory_streaming_and_not(tok, tmp_path):
  rng = np.random.default_rng(5)
  docs = [' '.join(rng.choice(WORDS[:20], size=rng.integers(1, 30))) for _ in range(60)]
  repo = _hub_repo(tmp_path / 'repo', docs[:50], docs[50:])
  # The definition: rows of datasets.load_dataset(repo, split=...) in order, one document each.
  train_docs = datasets.load_dataset(repo, split='train', cache_dir=str(tmp_path / 'hf'))['content']
  assert train_docs == docs[:50]
  flat = corpus.concat_documents(corpus.tokenize_documents(train_docs, corpus.backend(tok)), SEP)
  expected = corpus.wrap_windows(flat[:-1], 16, CLS, SEP, PAD)
  packed = ip.load_packed((), tok, 16, cache_dir=str(tmp_path / 'c'), dataset=repo,
                          text_column='content', num_proc=2)
  np.testing.assert_array_equal(np.asarray(packed), expected)
  assert len(packed.manifest['shards']) == 2  # one unit per parquet file
  valid = ip.load_packed((), tok, 16, cache_dir=str(tmp_path / 'c'), dataset=repo,
                         dataset_split='validation', text_column='content')
  assert 0 < len(valid) < len(packed)
  kw = dict(global_batch_size=4, seed=0, mlm_probability=0.0, num_epochs=1, dataset=repo,
            text_column='content')
  streamed = np.concatenate([b['input_ids'] for b in ip.streaming_batches((), tok, 16, **kw)])
  np.testing.assert_array_equal(streamed, expected[:len(streamed)])
  with pytest.raises(ValueError, match="no split 'test'.*data.dataset_split"):
    ip.load_packed((), tok, 16, cache_dir=str(tmp_path / 'c'), dataset=repo, dataset_split='test')
  with pytest.raises(ValueError, match='no "text" column.*data.text_column'):
    ip.load_packed((), tok, 16, cache_dir=str(tmp_path / 'c'), dataset=repo, num_proc=1)
  with pytest.raises(ValueError, match='Cannot resolve dataset'):
    ip.load_packed((), tok, 16, cache_dir=str(tmp_path / 'c'), dataset=str(tmp_path / 'nope'))


def _iterator(packed, **kw):
  args = dict(global_batch_size=8, seed=3, mask_token_id=MASK, vocab_size=len(WORDS) + 5,
              special_token_ids=[PAD, UNK, CLS, SEP, MASK], prefetch=0)
  args.update(kw)
  return ip.BatchIterator(packed, **args)


def test_batches_from_disk_equal_in_memory_and_hosts_read_only_their_rows(tok, tmp_path):
  f = tmp_path / 'b.txt'
  f.write_text(messy_text(np.random.default_rng(6), 60))
  packed = ip.load_packed([str(f)], tok, 16, cache_dir=str(tmp_path))
  memory = np.asarray(packed)
  probs = masking.token_probabilities(packed, len(WORDS) + 5, 0.7, [PAD, UNK, CLS, SEP, MASK])
  np.testing.assert_allclose(probs, masking.token_probabilities(memory, len(WORDS) + 5, 0.7,
                                                           [PAD, UNK, CLS, SEP, MASK]))
  for extra in ({}, {'token_probs': probs}):
    disk, ram = _iterator(packed, **extra), _iterator(memory, **extra)
    for step in (0, 1, 10 ** 6):  # a late step resumes directly: rows of its epoch only
      a, b = disk.batch_for_step(step), ram.batch_for_step(step)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  read = []
  real_getitem = corpus.PackedDataset.__getitem__

  class Spy(corpus.PackedDataset):
    def __getitem__(self, index):
      read.append(np.size(index))
      return real_getitem(self, index)

  spy = Spy(packed.directory, 16, cls_id=CLS, sep_id=SEP, pad_id=PAD)
  hosts = [_iterator(spy, process_index=p, process_count=4) for p in range(4)]
  whole = _iterator(memory).batch_for_step(7)
  parts = [h.batch_for_step(7) for h in hosts]
  assert read == [2, 2, 2, 2]  # each host read its 8/4 rows, not the global batch
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


@pytest.mark.slow
def test_run_reads_a_hub_dataset_into_the_shared_cache(tmp_path, monkeypatch):
  syn = synthetic.write_corpus(str(tmp_path / 'syn'))
  docs = open(syn['train_files'][0]).read().split('\n\n')
  repo = _hub_repo(tmp_path / 'repo', docs[:len(docs) * 9 // 10], docs[len(docs) * 9 // 10:],
                   column='text')
  monkeypatch.setenv('FLAXDISTIL_CACHE', str(tmp_path / 'shared_cache'))
  cfg = tiny_config(**{'data.synthetic': False, 'data.tokenizer': syn['tokenizer'],
                       'data.dataset': repo, 'data.dataset_eval_split': 'validation',
                       'data.num_proc': 1})  # the 2-process path is tested above
  run = setup.build_run(cfg, str(tmp_path / 'w1'))
  tokenizer = tokenization.load_tokenizer(syn['tokenizer'])
  def no_tokenizing(*_):
    raise AssertionError('tokenised again')

  monkeypatch.setattr(corpus, 'tokenize_documents', no_tokenizing)
  # The run built into the shared default cache (no workdir in the key): here it is a hit.
  packed = ip.load_packed((), tokenizer, cfg.data.max_seq_length, dataset=repo)
  assert packed.directory.startswith(str(tmp_path / 'shared_cache'))
  ref = _iterator(packed, global_batch_size=cfg.data.global_batch_size, seed=cfg.seed,
                  mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                  special_token_ids=sorted(set(tokenizer.all_special_ids)))
  with run.train_batches(5) as it:
    got = next(it)
  for k, v in ref.batch_for_step(5).items():
    np.testing.assert_array_equal(got[k], v)
  assert len(run.eval_batches()) > 0
  cfg.data.train_files = tuple(syn['train_files'])
  with pytest.raises(setup.ConfigError, match='Both data.train_files and data.dataset'):
    setup.build_run(cfg, str(tmp_path / 'w2'))
