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


@pytest.mark.parametrize('kind', ['bert', 'distilbert'])
def test_zero_heads_of_pruned_heads_are_removed_without_changing_outputs(tmp_path, kind):
  torch.manual_seed(0)
  if kind == 'bert':
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=32,
                                  max_position_embeddings=16)
  else:
    cfg = transformers.DistilBertConfig(**dict(_CFG, n_layers=2, n_heads=4))
  model = transformers.AutoModelForMaskedLM.from_config(cfg).eval()
  pruned = {0: [1, 2], 1: [3]}
  with torch.no_grad():  # zero the heads as hf_conversion writes them
    for i, heads in pruned.items():
      att, qkv, owner, out_name, _ = torch_models._attention_modules(model)[i]
      for h in heads:
        rows = slice(h * 4, (h + 1) * 4)
        for name in qkv:
          getattr(att, name).weight[rows] = 0
          getattr(att, name).bias[rows] = 0
        getattr(owner, out_name).weight[:, rows] = 0
  model.config.pruned_heads = pruned
  model.save_pretrained(tmp_path)
  dense, _ = torch_models.load_torch_model(str(tmp_path), remove_pruned=False)
  small, _ = torch_models.load_torch_model(str(tmp_path))
  count = lambda m: sum(p.numel() for p in m.parameters())
  assert count(dense) - count(small) == 3 * (3 * (16 * 4 + 4) + 16 * 4)  # 3 heads: qkv + out
  ids = torch.randint(0, 64, (2, 7))
  mask = torch.ones(2, 7, dtype=torch.long)
  mask[1, 4:] = 0
  with torch.no_grad():
    a = dense(input_ids=ids, attention_mask=mask).logits
    b = small(input_ids=ids, attention_mask=mask).logits
  torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
  assert torch_models.remove_pruned_heads(small) == 0  # already removed: nothing to do


def test_pruned_heads_that_are_not_zero_are_an_error(tmp_path):
  cfg = transformers.DistilBertConfig(**_CFG, pruned_heads={0: [1]})
  transformers.DistilBertForMaskedLM(cfg).save_pretrained(tmp_path)  # random, not zero
  with pytest.raises(ValueError, match='not zero'):
    torch_models.load_torch_model(str(tmp_path))
  model, _ = torch_models.load_torch_model(str(tmp_path), remove_pruned=False)
  assert model.distilbert.transformer.layer[0].attention.n_heads == 2
