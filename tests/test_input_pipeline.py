"""flaxdistil.data.input_pipeline: packing, batches, resume, hosts, prefetch (tiny tokenizer, tiny files)."""
import gc
import json
import os
import threading

import numpy as np
import pytest

from flaxdistil.data import corpus
from flaxdistil.data import input_pipeline as ip
from flaxdistil.data import masking

# the `tok` fixture's vocabulary and the shared helpers (tests/conftest.py)
from conftest import CLS
from conftest import MASK
from conftest import MASK_KW
from conftest import PAD
from conftest import SEP
from conftest import SPECIALS
from conftest import WORDS
from conftest import fake_batch


def ids(tok, text):
  return tok(text, add_special_tokens=False)['input_ids']


def random_docs(rng, n_docs, max_words=60):
  docs = []
  for _ in range(n_docs):
    paras = [' '.join(rng.choice(WORDS[:20], size=rng.integers(1, max_words)))
             for _ in range(rng.integers(1, 4))]
    docs.append('\n'.join(paras))
  return docs


def write_docs(path, docs):
  path.write_text('\n\n'.join(docs) + '\n', encoding='utf-8')
  return str(path)


def test_packing_layout_exact(tok, tmp_path):
  f = write_docs(tmp_path / 'a.txt', ['the cat sat\non the mat', 'the dog ran'])
  packed = ip.load_packed_dataset([f], tok, 8, cache_dir=None)
  w = {t: i for i, t in enumerate(SPECIALS + WORDS)}
  doc1 = [w[t] for t in 'the cat sat on the mat'.split()]
  doc2 = [w[t] for t in 'the dog ran'.split()]
  # 6 + [SEP] + 3 tokens in windows of 6: the document separator starts the second window.
  expected = np.array([[CLS] + doc1 + [SEP], [CLS, SEP] + doc2 + [SEP, PAD, PAD]], np.int32)
  assert packed.dtype == np.int32
  np.testing.assert_array_equal(packed, expected)


@pytest.mark.parametrize('max_seq_length', [8, 13, 32])
def test_packing_no_token_lost_long_lines_split(tok, tmp_path, max_seq_length):
  rng = np.random.default_rng(max_seq_length)
  docs = random_docs(rng, 30) + [' '.join(['tree'] * 100)]  # a single line far longer than T
  f1 = write_docs(tmp_path / 'one.txt', docs[:20])
  f2 = write_docs(tmp_path / 'two.txt', docs[20:])
  packed = ip.load_packed_dataset([f1, f2], tok, max_seq_length, cache_dir=None)
  assert packed.shape[1] == max_seq_length
  expected = []
  for d in docs:
    expected += ids(tok, d) + [SEP]
  expected = expected[:-1]
  body = packed[:, 1:-1].ravel()
  got = [t for t in packed.ravel() if t not in (CLS, PAD)]
  # Each row adds one trailing [SEP]; dropping them gives the exact token stream back.
  seps_in_rows = [r[(r != PAD)][-1] for r in packed]
  assert all(s == SEP for s in seps_in_rows)
  stream = []
  for r in packed:
    real = r[r != PAD]
    assert real[0] == CLS and real[-1] == SEP
    stream += list(real[1:-1])
  assert stream == expected
  assert len(got) == len(expected) + len(packed)
  assert np.all(packed[:, 0] == CLS)
  assert np.all(packed[:-1] != PAD)  # only the last row is padded
  assert np.count_nonzero(body == ids(tok, 'tree')[0]) >= 100  # long line split, not dropped
  assert len(packed) == -(-len(expected) // (max_seq_length - 2))


def test_max_documents_and_json(tok, tmp_path):
  docs = ['the cat', 'a dog', 'big red house']
  f = write_docs(tmp_path / 'd.txt', docs)
  packed = ip.load_packed_dataset([f], tok, 8, cache_dir=None, max_documents=2)
  np.testing.assert_array_equal(packed[0], [CLS] + ids(tok, 'the cat') + [SEP]
                                + ids(tok, 'a dog') + [SEP, PAD])
  j = tmp_path / 'd.jsonl'
  j.write_text(''.join(json.dumps({'text': d, 'id': i}) + '\n' for i, d in enumerate(docs)))
  np.testing.assert_array_equal(ip.load_packed_dataset([str(j)], tok, 16, cache_dir=None),
                                ip.load_packed_dataset([f], tok, 16, cache_dir=None))
  bad = tmp_path / 'b.jsonl'
  bad.write_text(json.dumps({'body': 'the cat'}) + '\n')
  with pytest.raises(ValueError, match='no "text" column'):
    ip.load_packed_dataset([str(bad)], tok, 16, cache_dir=None)


def test_cache_hit_does_not_retokenize(tok, tmp_path, monkeypatch):
  f = write_docs(tmp_path / 'c.txt', random_docs(np.random.default_rng(0), 10))
  calls = []
  real = corpus.tokenize_documents
  monkeypatch.setattr(corpus, 'tokenize_documents', lambda t, b: calls.append(len(t)) or real(t, b))
  cache = tmp_path / 'cache'
  first = ip.load_packed_dataset([f], tok, 16, cache_dir=str(cache))
  n = len(calls)
  assert n > 0
  second = ip.load_packed_dataset([f], tok, 16, cache_dir=str(cache))
  assert len(calls) == n
  np.testing.assert_array_equal(first, second)
  built = [p for p in os.listdir(cache) if p.startswith('tokens-') and not p.endswith('.lock')]
  assert len(built) == 1 and not any(p.startswith('.tmp') for p in os.listdir(cache / built[0]))
  # The token cache does not depend on max_seq_length: another length is a hit, cut differently.
  long = ip.load_packed_dataset([f], tok, 32, cache_dir=str(cache))
  assert len(calls) == n
  np.testing.assert_array_equal(long, ip.load_packed_dataset([f], tok, 32, cache_dir=None))
  n = len(calls)
  with open(f, 'a') as fh:
    fh.write('\nthe red bird\n')  # size/mtime change invalidates the cache
  third = ip.load_packed_dataset([f], tok, 16, cache_dir=str(cache))
  assert len(calls) > n and not np.array_equal(third, first)


def test_errors(tok, tmp_path):
  good = write_docs(tmp_path / 'g.txt', ['the cat'])
  with pytest.raises(FileNotFoundError) as e:
    ip.load_packed_dataset([good, str(tmp_path / 'x.txt'), str(tmp_path / 'y.txt')], tok, 16,
                           cache_dir=None)
  assert 'x.txt' in str(e.value) and 'y.txt' in str(e.value) and 'g.txt' not in str(e.value)
  blank = tmp_path / 'blank.txt'
  blank.write_text('\n\n  \n\n')
  empty = tmp_path / 'empty.txt'
  empty.write_text('')
  with pytest.raises(ValueError, match='Empty dataset: no tokens'):
    ip.load_packed_dataset([str(blank), str(empty)], tok, 16, cache_dir=None)
  latin = tmp_path / 'latin1.txt'
  latin.write_bytes('the caf\xe9 sat\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'latin1\.txt is not valid UTF-8.*re-encode'):
    ip.load_packed_dataset([good, str(latin)], tok, 16, cache_dir=None)
  with pytest.raises(ValueError, match='max_seq_length=4 is too small'):
    ip.load_packed_dataset([good], tok, 4, cache_dir=None)
  odd = tmp_path / 'a.csv'
  odd.write_text('text\nthe cat\n')
  with pytest.raises(ValueError, match="extension '.csv'"):
    ip.load_packed_dataset([str(odd)], tok, 16, cache_dir=None)
  with pytest.raises(ValueError, match='not divisible by process_count=3'):
    ip.BatchIterator(np.ones((4, 8), np.int32), global_batch_size=8, seed=0, process_count=3,
                     mask_token_id=MASK, vocab_size=30, special_token_ids=[0, 1, 2, 3, 4])


def make_packed(n, t=16):
  """Rows whose token 1 encodes the row index so rows can be identified after masking."""
  x = fake_batch(n, t, 40, np.random.default_rng(3))
  x[:, 1] = 5 + np.arange(n)  # never a special id
  return x


def iterator(packed, **kw):
  args = dict(global_batch_size=8, seed=7, vocab_size=40 + len(packed), **MASK_KW)
  args.update(kw)
  return ip.BatchIterator(packed, **args)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys() == {'input_ids', 'attention_mask', 'labels'}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_batch_iterator_reproducible_and_resumable():
  packed = make_packed(20)
  with iterator(packed) as it:
    batches = [next(it) for _ in range(8)]  # 64 rows: crosses 3 epoch boundaries
    assert it.step == 8
  b = batches[0]
  assert b['input_ids'].shape == (8, 16) and all(v.dtype == np.int32 for v in b.values())
  with iterator(packed, start_step=5, prefetch=0) as it:
    assert it.step == 5
    for k in range(5, 8):
      assert_batches_equal(next(it), batches[k])
  with iterator(packed) as it2:
    assert_batches_equal(next(it2), batches[0])
  with iterator(packed, seed=8) as other:
    assert not np.array_equal(next(other)['input_ids'], batches[0]['input_ids'])
  # Each epoch visits every row once: rows of steps 0..4 (40 = 2 epochs) cover all rows twice.
  src = iterator(packed, mlm_probability=0.0, prefetch=0)
  seen = np.concatenate([src.batch_for_step(s)['input_ids'][:, 1] for s in range(5)]) - 5
  assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
  assert not np.array_equal(seen[:20], seen[20:])  # reshuffled per epoch
  for step in (3, 4):  # masking = mask_tokens(global rows, default_rng([seed, 1, step]))
    rows = src.batch_for_step(step)['input_ids']
    masked, labels = masking.mask_tokens(rows, np.random.default_rng([7, 1, step]),
                                    vocab_size=40 + len(packed), **MASK_KW)
    np.testing.assert_array_equal(masked, batches[step]['input_ids'])
    np.testing.assert_array_equal(labels, batches[step]['labels'])
  ref = src.batch_for_step(0)
  np.testing.assert_array_equal(ref['attention_mask'], (packed[seen[:8]] != PAD).astype(np.int32))
  np.testing.assert_array_equal(ref['input_ids'], packed[seen[:8]])
  assert np.all(ref['labels'] == -100)


def test_multi_process_concatenates_to_single_process():
  packed = make_packed(30)
  single = iterator(packed, global_batch_size=12, prefetch=0)
  hosts = [iterator(packed, global_batch_size=12, process_index=p, process_count=4)
           for p in range(4)]
  for step in range(4):
    parts = [next(h) for h in hosts]
    assert parts[0]['input_ids'].shape == (3, 16)
    whole = single.batch_for_step(step)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  for h in hosts:
    h.close()


def test_row_features_hook_reads_only_this_hosts_rows():
  """The hook (cached teacher targets) is asked for this host's rows and sample indices only."""
  packed, calls = make_packed(30), []

  def hook(rows, samples):
    calls.append((rows.copy(), samples.copy()))
    return {'row_id': rows[:, None].astype(np.int32)}

  single = iterator(packed, global_batch_size=12, prefetch=0)
  host = iterator(packed, global_batch_size=12, process_index=2, process_count=4, prefetch=0,
                  row_features=hook, mlm_probability=0.0)  # unmasked: token 1 names the row
  for step in (0, 5):
    batch = host.batch_for_step(step)
    rows, samples = calls[-1]
    np.testing.assert_array_equal(rows, single.rows(step)[6:9])
    np.testing.assert_array_equal(samples, step * 12 + np.arange(6, 9))
    np.testing.assert_array_equal(batch['row_id'][:, 0], batch['input_ids'][:, 1] - 5)
  assert len(calls) == 2


def test_prefetch_thread_close_and_errors(monkeypatch):
  packed = make_packed(20)
  before = threading.active_count()
  it = iterator(packed, prefetch=3)
  next(it)
  it.close()
  assert not it._thread.is_alive() and it._thread.daemon
  assert threading.active_count() == before
  with pytest.raises(RuntimeError, match='closed'):
    next(it)
  it = iterator(packed, prefetch=3)
  thread = it._thread
  del it  # forgotten without close(): garbage collection stops the thread
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()
  calls = []
  real = masking.mask_tokens

  def flaky(*a, **k):
    calls.append(1)
    if len(calls) == 3:
      raise KeyError('boom in producer')
    return real(*a, **k)

  monkeypatch.setattr(masking, 'mask_tokens', flaky)
  it = iterator(packed, prefetch=2)
  next(it), next(it)
  with pytest.raises(KeyError, match='boom in producer'):
    next(it)
  it._thread.join(timeout=5)
  assert not it._thread.is_alive()


def test_eval_batches_fixed_and_padded():
  packed = make_packed(11)
  kw = dict(vocab_size=60, **MASK_KW)
  first = ip.eval_batches(packed, 4, 3, 10, **kw)
  second = ip.eval_batches(packed, 4, 3, 10, **kw)
  assert len(first) == 3
  for a, b in zip(first, second):
    assert_batches_equal(a, b)
  last = first[-1]
  assert last['input_ids'].shape == (4, 16)
  assert np.all(last['attention_mask'][2:] == 0) and np.all(last['labels'][2:] == -100)
  assert np.all(last['input_ids'][2:] == PAD)
  plain = ip.eval_batches(packed, 4, 3, None, mlm_probability=0.0, **kw)
  np.testing.assert_array_equal(np.concatenate([b['input_ids'] for b in plain])[:11], packed)
  assert sum((b['labels'] != -100).sum() for b in first) > 0


def test_streaming_matches_packed_order_and_resumes(tok, tmp_path):
  docs = random_docs(np.random.default_rng(5), 40)
  f1 = write_docs(tmp_path / 's1.txt', docs[:25])
  f2 = write_docs(tmp_path / 's2.txt', docs[25:])
  packed = ip.load_packed_dataset([f1, f2], tok, 16, cache_dir=None)
  n = len(packed)
  kw = dict(global_batch_size=4, seed=1, mlm_probability=0.0, num_epochs=2)
  got = np.concatenate([b['input_ids'] for b in ip.streaming_batches([f1, f2], tok, 16, **kw)])
  np.testing.assert_array_equal(got, np.concatenate([packed, packed])[:len(got)])
  assert len(got) == (2 * n) // 4 * 4
  kw['mlm_probability'] = 0.15
  full = list(ip.streaming_batches([f1, f2], tok, 16, **kw))
  resumed = list(ip.streaming_batches([f1, f2], tok, 16, start_position=3, **kw))
  assert len(resumed) == len(full) - 3
  for a, b in zip(full[3:], resumed):
    assert_batches_equal(a, b)
  host1 = next(ip.streaming_batches([f1, f2], tok, 16, process_index=1, process_count=2, **kw))
  for k in host1:
    np.testing.assert_array_equal(host1[k], full[0][k][2:])


def test_batch_spec_is_what_the_iterator_yields():
  packed = np.arange(40 * 8, dtype=np.int32).reshape(40, 8) % 90 + 5
  it = ip.BatchIterator(packed, global_batch_size=8, seed=0, mask_token_id=MASK, vocab_size=100,
                        special_token_ids=[0, 1, 2, 3, 4])
  batch = next(it)
  it.close()
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == ip.batch_spec(8, 8)
