"""flaxdistil.training.run_data: eval batches split over the batch shards; data identity by files."""

from flaxdistil.training import run_data
from flaxdistil.training import sharding

from conftest import tiny_config

RULES = sharding.rules_tuple(tiny_config().mesh.logical_axis_rules)


def test_eval_batch_size_is_a_multiple_of_the_batch_shards_and_at_least_one_row_each():
  d = tiny_config().data
  for eval_bs, shape, want in ((64, {'data': 8, 'fsdp': 1, 'tensor': 1}, 64),
                               (30, {'data': 4, 'fsdp': 2, 'tensor': 1}, 24),
                               (3, {'data': 8, 'fsdp': 1, 'tensor': 1}, 8),
                               (30, {'data': 1, 'fsdp': 1, 'tensor': 8}, 30)):  # tensor: no split
    d.eval_batch_size = eval_bs
    assert run_data.eval_batch_size(d, shape, RULES) == want, (eval_bs, shape)


def test_files_id_is_names_and_sizes_of_existing_files(tmp_path):
  (tmp_path / 'a.txt').write_text('hello')
  assert run_data.files_id([str(tmp_path / 'a.txt'), str(tmp_path / 'gone.txt')]) == [
      ['a.txt', 5]]
