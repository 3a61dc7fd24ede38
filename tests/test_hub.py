"""Local path or hub name (one rule for every setting), whether an error means the Hub could not be
reached (through exception chains), and HF_HUB_OFFLINE."""

import pytest

from flaxdistil.storage import hub


@pytest.mark.parametrize('name', ['bert-base-uncased', 'google-bert/bert-base-uncased', 'org/name'])
def test_hub_names_are_not_local_paths(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # nothing of that name here
  assert not hub.looks_like_local_path(name)


@pytest.mark.parametrize('path', ['./x', '../x', '.', '/x', '/srv/models/bert', '~/x', '~',
                                  'a/b/c', 'runs/exp/teacher_hf'])
def test_paths_are_local_even_when_missing(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert hub.looks_like_local_path(path)


def test_an_existing_relative_directory_is_local(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'org' / 'name').mkdir(parents=True)
  (tmp_path / 'bert-base-uncased').mkdir()
  assert hub.looks_like_local_path('org/name') and hub.looks_like_local_path('bert-base-uncased')
  assert not hub.looks_like_local_path('org/other')


class OfflineModeIsEnabled(Exception):  # huggingface_hub's name; matched by type name
  pass


class LocalEntryNotFoundError(FileNotFoundError):
  pass


class ConnectError(Exception):  # httpx
  pass


def _raise_from(outer, inner, how):
  """`outer` raised with `inner` as its __cause__ ('from') or __context__ ('during')."""
  try:
    try:
      raise inner
    except Exception as e:  # pylint: disable=broad-except
      if how == 'from':
        raise outer from e
      raise outer  # pylint: disable=raise-missing-from
  except Exception as e:  # pylint: disable=broad-except
    return e


def test_hub_unreachable_by_type_name_and_text():
  assert not hub.hub_unreachable(None)
  assert not hub.hub_unreachable(ValueError('404 Client Error: repository not found'))
  assert not hub.hub_unreachable(FileNotFoundError('/x/config.json does not exist'))
  for e in (OfflineModeIsEnabled('x'), LocalEntryNotFoundError('x'), ConnectError('x'),
            ConnectionRefusedError('x'), OSError("We couldn't connect to 'https://huggingface.co'"),
            RuntimeError('Outgoing traffic has been disabled.')):
    assert hub.hub_unreachable(e), repr(e)


@pytest.mark.parametrize('how', ['from', 'during'])
def test_hub_unreachable_follows_cause_and_context_chains(how):
  inner = _raise_from(RuntimeError('snapshot_download failed'), ConnectError('DNS'), how)
  assert hub.hub_unreachable(inner)
  outer = _raise_from(ValueError('cannot load teacher'), inner, how)  # two levels down
  assert hub.hub_unreachable(outer)
  assert not hub.hub_unreachable(_raise_from(ValueError('a'), KeyError('b'), how))


def test_hub_unreachable_terminates_on_a_cyclic_chain():
  a, b = ValueError('a'), ValueError('b')
  a.__cause__, b.__cause__ = b, a
  assert not hub.hub_unreachable(a)


@pytest.mark.parametrize('value, offline', [('1', True), ('true', True), ('YES', True),
                                            ('On', True), ('0', False), ('false', False),
                                            ('', False), (None, False)])
def test_hub_offline_reads_hf_hub_offline(monkeypatch, value, offline):
  if value is None:
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  else:
    monkeypatch.setenv('HF_HUB_OFFLINE', value)
  assert hub.hub_offline() is offline
  assert hub.unreachable_reason() == ('offline (HF_HUB_OFFLINE=1)' if offline else 'unreachable')
