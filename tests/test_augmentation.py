"""flaxdistil.data.augmentation (TinyBERT Algorithm 1): which words are replaced, by the MLM's
top-K at the masked word or by embedding neighbours, the copies, and a deterministic, resumable
GLUE TSV whatever the batch size and chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdistil.data import augmentation
from flaxdistil.data import glue
from flaxdistil.model import bert

TOP_K = 5
MRPC_HEADER = ['Quality', '#1 ID', '#2 ID', '#1 String', '#2 String']
ROWS = [['1', '1', '2', 'The cat sat on the mat.', 'A dog sat on the mat.'],
        ['0', '3', '4', 'Big birds flew over the hill', 'the red house'],
        ['1', '5', '6', 'small cats ran', 'blue trees and a green hill'],
        ['0', '7', '8', 'the the the', 'dog'],
        ['1', '9', '10', 'red tree', 'cats sat']]


@pytest.fixture(scope='module')
def model(tok):
  cfg = bert.ModelConfig(model_type='bert', vocab_size=len(tok), hidden_size=16,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=32)
  return cfg, jax.device_get(bert.init_params(cfg, jax.random.PRNGKey(0)))


@pytest.fixture(scope='module')
def aug(tok, model):
  return augmentation.Augmenter(*model, tok, top_k=TOP_K, batch_size=4, max_seq_length=32)


def _allowed(tok):
  vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
  return np.array([t.isalpha() and i not in set(tok.all_special_ids) for i, t in enumerate(vocab)])


def test_only_alphabetic_words_that_are_not_stop_words_are_replaceable(aug):
  s = aug.split('The Cat sat on the mat, big!')
  assert s.words == ['the', 'cat', 'sat', 'on', 'the', 'mat', ',', 'big', '!']
  assert [s.words[i] for i in s.slots] == ['cat', 'sat', 'mat', 'big']  # 'the', 'on': stop words


def test_candidates_are_the_masked_mlm_top_k_and_embedding_neighbours(tok, model, aug):
  cfg, params = model
  s = aug.split('the cat sat on the cats')
  aug.candidates([s])
  assert [s.words[i] for i in s.slots] == ['cat', 'sat', 'cats'] and s.candidates.shape == (3, 5)
  bias = np.where(_allowed(tok), 0.0, -np.inf)
  ids = tok.convert_tokens_to_ids(['[CLS]', 'the', '[MASK]', 'sat', 'on', 'the', 'cat', '##s',
                                   '[SEP]'])
  logits = bert.MaskedLM(cfg).apply({'params': params}, jnp.asarray([ids]),
                                    jnp.ones((1, len(ids)), jnp.int32)).logits[0, 2]
  want = np.argsort(-(np.asarray(logits) + bias), kind='stable')[:TOP_K]
  assert s.candidates[0].tolist() == want.tolist()
  # 'cats' = cat + ##s: nearest whole words to the mean of the two piece embeddings
  emb = np.asarray(params['embeddings']['word_embeddings']['embedding'])
  v = emb[tok.convert_tokens_to_ids(['cat', '##s'])].mean(0)
  cos = emb @ v / (np.linalg.norm(emb, axis=1) * np.linalg.norm(v))
  assert s.candidates[2].tolist() == np.argsort(-(cos + bias), kind='stable')[:TOP_K].tolist()
  assert all(_allowed(tok)[s.candidates.ravel()])  # never ##s, [MASK], punctuation


def test_words_past_the_mlm_cut_are_not_replaced(tok, model):
  short = augmentation.Augmenter(*model, tok, top_k=TOP_K, max_seq_length=4)  # 2 word pieces
  s = short.split('cat dog bird tree')
  short.candidates([s])
  assert [s.words[i] for i in s.slots] == ['cat', 'dog']


def test_copies_replace_slots_with_candidates_and_drop_duplicates(aug):
  sents = [aug.split('the cat sat on the mat'), aug.split('a big dog')]
  aug.candidates(sents)
  vocab = aug.vocab
  assert augmentation.sample_copies(sents, vocab, n_a=20, p_t=0.0,
                                    rng=np.random.default_rng(0)) == []  # all equal the original
  copies = augmentation.sample_copies(sents, vocab, n_a=20, p_t=1.0, rng=np.random.default_rng(0))
  assert 0 < len(copies) <= 20 and len(set(copies)) == len(copies)
  for a, b in copies:
    for s, text in zip(sents, (a, b)):
      words = text.split(' ')
      assert len(words) == len(s.words)
      for j, i in enumerate(s.slots):  # p_t = 1: every slot holds one of its candidates
        assert words[i] in {vocab[c] for c in s.candidates[j]}
      assert [w for i, w in enumerate(words) if i not in s.slots] == [
          w for i, w in enumerate(s.words) if i not in s.slots]
  again = augmentation.sample_copies(sents, vocab, n_a=20, p_t=1.0, rng=np.random.default_rng(0))
  assert again == copies
  some = augmentation.sample_copies(sents, vocab, n_a=50, p_t=0.4, rng=np.random.default_rng(1))
  original = [w for s in sents for w in s.words]
  changed = np.mean([sum(a != b for a, b in zip(' '.join(c).split(' '), original)) for c in some])
  assert 0 < changed < 5  # about p_t of the 5 slots (less replacements by the word itself)


def _write(tmp_path, rows=ROWS):
  path = str(tmp_path / 'train.tsv')
  glue.write_tsv(path, MRPC_HEADER, rows)
  return path


def test_augmented_file_is_the_same_for_any_batching_and_keeps_labels(tmp_path, tok, model):
  train = _write(tmp_path)
  outs = []
  for chunk, batch in ((2, 3), (5, 8)):
    a = augmentation.Augmenter(*model, tok, top_k=TOP_K, batch_size=batch, max_seq_length=32)
    out = str(tmp_path / f'aug_{chunk}.tsv')
    report = augmentation.augment_file(train, out, glue.TASKS['mrpc'], a, n_a=6, p_t=0.5,
                                       seed=3, chunk_size=chunk)
    outs.append(open(out).read())
  assert outs[0] == outs[1]
  header, rows = glue.read_table(out)
  assert header == MRPC_HEADER and report['rows'] == len(rows) and report['examples'] == 5
  assert 5 < len(rows) <= 5 * 7
  originals = [i for i, r in enumerate(rows) if r in ROWS]
  assert [rows[i] for i in originals] == ROWS  # verbatim, in order, each followed by its copies
  for start, end, src in zip(originals, originals[1:] + [len(rows)], ROWS):
    for r in rows[start + 1:end]:
      assert r[:3] == src[:3] and (r[3], r[4]) != (src[3], src[4])  # label and ids kept
  glue.read_tsv(out, glue.TASKS['mrpc'])  # the training path reads it
  other_seed = str(tmp_path / 'seed4.tsv')
  augmentation.augment_file(train, other_seed, glue.TASKS['mrpc'], a, n_a=6, p_t=0.5, seed=4,
                            chunk_size=5)
  assert open(other_seed).read() != outs[0]


def test_only_the_first_examples_are_augmented_with_num_examples(tmp_path, aug):
  train = _write(tmp_path)
  out = str(tmp_path / 'aug.tsv')
  report = augmentation.augment_file(train, out, glue.TASKS['mrpc'], aug, n_a=4, p_t=1.0,
                                     num_examples=2)
  _, rows = glue.read_table(out)
  assert report['augmented_examples'] == 2 and rows[-3:] == ROWS[2:]
  assert len(rows) == report['rows'] == 3 + 2 + report['copies_per_augmented_example'] * 2


def test_a_killed_run_resumes_from_its_finished_chunks(tmp_path, aug, monkeypatch):
  train = _write(tmp_path)
  ref = str(tmp_path / 'ref.tsv')
  augmentation.augment_file(train, ref, glue.TASKS['mrpc'], aug, n_a=5, p_t=0.5, chunk_size=2)
  out = str(tmp_path / 'out.tsv')
  calls, real = [], augmentation.augment_rows

  def dies_on_the_second_chunk(*args, **kw):
    calls.append(kw['first_index'])
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kw)

  monkeypatch.setattr(augmentation, 'augment_rows', dies_on_the_second_chunk)
  with pytest.raises(KeyboardInterrupt):
    augmentation.augment_file(train, out, glue.TASKS['mrpc'], aug, n_a=5, p_t=0.5, chunk_size=2)
  parts = tmp_path / 'out.tsv.parts'
  assert sorted(p.name for p in parts.iterdir()) == ['00000000.tsv', 'settings.json']
  with pytest.raises(ValueError, match='other settings'):
    augmentation.augment_file(train, out, glue.TASKS['mrpc'], aug, n_a=6, p_t=0.5, chunk_size=2)
  calls.clear()
  monkeypatch.setattr(augmentation, 'augment_rows', lambda *a, **kw: calls.append(
      kw['first_index']) or real(*a, **kw))
  augmentation.augment_file(train, out, glue.TASKS['mrpc'], aug, n_a=5, p_t=0.5, chunk_size=2)
  assert calls == [2, 4] and open(out).read() == open(ref).read() and not parts.exists()
  with pytest.raises(FileExistsError, match='already exists'):
    augmentation.augment_file(train, out, glue.TASKS['mrpc'], aug, n_a=5, p_t=0.5)


def test_bad_settings_are_refused(tmp_path, tok, model):
  cfg, params = model
  with pytest.raises(ValueError, match='MLM head'):
    augmentation.Augmenter(bert.ModelConfig(**{**cfg.__dict__, 'with_mlm_head': False}), params,
                           tok)
  with pytest.raises(ValueError, match=r'top_k=99 must be in \[1, 21\]'):
    augmentation.Augmenter(cfg, params, tok, top_k=99, max_seq_length=32)
  with pytest.raises(ValueError, match='max_position_embeddings 32'):
    augmentation.Augmenter(cfg, params, tok, max_seq_length=64)
  aug = augmentation.Augmenter(cfg, params, tok, top_k=2, max_seq_length=32)
  with pytest.raises(ValueError, match='p_t=1.5'):
    augmentation.augment_file(_write(tmp_path), str(tmp_path / 'o.tsv'), glue.TASKS['mrpc'], aug,
                              p_t=1.5)
  with pytest.raises(ValueError, match='not \\[.sentence.'):  # an MRPC file read as SST-2
    augmentation.augment_file(_write(tmp_path), str(tmp_path / 'o.tsv'), glue.TASKS['sst2'], aug)
