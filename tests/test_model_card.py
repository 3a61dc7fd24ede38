"""The exported model card (README.md): local paths absolute, hub names as given."""

from flaxdistil.export import model_card
from flaxdistil.model import bert


def test_model_card_paths_are_absolute_or_hub_names(tmp_path, monkeypatch):
  cfg = bert.ModelConfig(model_type='distilbert', vocab_size=40, hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
  train_file = str(tmp_path / 'data' / 'train.txt')
  meta = {'info': {'teacher': '../models/teacher', 'tokenizer': '/srv/models/teacher',
                   'train_files': [train_file], 'dataset': 'someorg/wiki',
                   'student_init': 'teacher', 'distill': {}},
          'fingerprint': {'global_batch_size': 8, 'max_seq_length': 32}}
  monkeypatch.chdir(tmp_path)  # somewhere else than where training ran
  card = model_card.model_card(meta, 6, cfg)
  # The relative teacher path is the one training resolved into info['tokenizer'].
  assert '`/srv/models/teacher`' in card and '../models' not in card
  assert f'`{train_file}`' in card and '`someorg/wiki`' in card  # full path; hub name as given
  # Without a matching absolute path, relative paths resolve against the current directory.
  meta['info'].update(teacher='./t', tokenizer='bert-base-uncased')
  assert f'`{tmp_path / "t"}`' in model_card.model_card(meta, 6, cfg)
  meta['info'].update(teacher='bert-base-uncased')
  assert '`bert-base-uncased`' in model_card.model_card(meta, 6, cfg)
