"""flaxdistil.export.torch_models: an exported directory loads as its own architecture, or fails."""

import json

import pytest
import torch
import transformers

from flaxdistil.export import torch_models

_CFG = dict(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16)


@pytest.mark.parametrize('cls, output', [
    (transformers.DistilBertForMaskedLM, 'logits'),
    (transformers.DistilBertForSequenceClassification, 'logits'),
    (transformers.DistilBertModel, 'last_hidden_state'),
])
def test_loads_by_architecture_in_eval_mode(tmp_path, cls, output):
  torch.manual_seed(0)
  cls(transformers.DistilBertConfig(**_CFG)).save_pretrained(tmp_path)
  model, name = torch_models.load_torch_model(str(tmp_path))
  assert type(model) is cls and name == output and not model.training
  assert next(model.parameters()).dtype == torch.float32


def test_missing_tensors_and_other_model_types_are_errors(tmp_path):
  mlm = tmp_path / 'mlm'
  transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(**_CFG)).save_pretrained(mlm)
  # A checkpoint without the MLM head, declared as *ForMaskedLM: missing tensors, not random ones.
  bare = tmp_path / 'bare'
  transformers.DistilBertModel(transformers.DistilBertConfig(**_CFG)).save_pretrained(bare)
  cfg = json.loads((bare / 'config.json').read_text())
  cfg['architectures'] = ['DistilBertForMaskedLM']
  (bare / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match='loading problems'):
    torch_models.load_torch_model(str(bare))
  gpt = tmp_path / 'gpt'
  gpt.mkdir()
  (gpt / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  with pytest.raises(ValueError, match='only BERT and DistilBERT'):
    torch_models.load_torch_model(str(gpt))
  with pytest.raises(FileNotFoundError, match='no such directory'):
    torch_models.load_torch_model(str(tmp_path / 'nope'))
