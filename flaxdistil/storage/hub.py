"""Local path or Hugging Face Hub name, and whether the Hub can be reached.

One rule for every setting that takes "a directory or a hub name" (`teacher.path`,
`student.path`, `data.tokenizer`, `data.dataset`): a string that exists on disk, is absolute,
starts with '.' or '~', or has more than one '/' is a local path; anything else
('bert-base-uncased', 'google-bert/bert-base-uncased') may be a hub name, so a missing
'org/name' directory is looked up on the Hub rather than reported missing.
"""

from __future__ import annotations

import os

# Exception type names (huggingface_hub, httpx, requests) that mean "the Hub could not be reached".
_UNREACHABLE_TYPES = ('OfflineModeIsEnabled', 'LocalEntryNotFoundError', 'ConnectError',
                      'ConnectTimeout', 'ConnectionError')
_UNREACHABLE_TEXT = ("couldn't connect to", 'outgoing traffic has been disabled', 'hub is offline',
                     'hub is unreachable')


def looks_like_local_path(s: str) -> bool:
  """True for what can only be a filesystem path, not a hub name.

  Existing paths, absolute paths, paths starting with '.' or '~', and paths with more
  than one '/' (or the OS separator, on Windows) are local; 'bert-base-uncased' and
  'google-bert/bert-base-uncased' are not (unless such a path exists on disk).

  Args:
    s: a setting's value, e.g. `teacher.path`.

  Returns:
    True if `s` must be treated as a local path, False if it may be a hub name.
  """
  return (os.path.exists(os.path.expanduser(s)) or os.path.isabs(s) or s.startswith(('.', '~'))
          or s.count('/') > 1 or (os.sep != '/' and os.sep in s))


def hub_offline() -> bool:
  """True if `HF_HUB_OFFLINE` is '1', 'true', 'yes' or 'on' (any case), huggingface_hub's rule."""
  return os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')


def hub_unreachable(error: BaseException | None) -> bool:
  """True if `error`, or an exception it was raised from, says the Hub could not be reached.

  Follows `__cause__` / `__context__`; an exception counts if it is a `ConnectionError`, has one
  of the huggingface_hub / httpx / requests type names in `_UNREACHABLE_TYPES`, or its message
  contains one of `_UNREACHABLE_TEXT`.

  Args:
    error: the exception a Hub call raised, or None (then False).

  Returns:
    Whether the failure means "offline / unreachable" rather than "no such repo".
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error).lower()
    if (isinstance(error, ConnectionError) or type(error).__name__ in _UNREACHABLE_TYPES
        or any(t in text for t in _UNREACHABLE_TEXT)):
      return True
    error = error.__cause__ or error.__context__
  return False


def unreachable_reason() -> str:
  """Returns 'offline (HF_HUB_OFFLINE=1)' if `hub_offline()`, else 'unreachable' (for messages)."""
  return 'offline (HF_HUB_OFFLINE=1)' if hub_offline() else 'unreachable'
