"""flaxdistil.data.documents: units cut a file only where its paragraphs already split."""

import numpy as np

from flaxdistil.data import documents

from conftest import WORDS


def messy_text(rng, n_docs):
  """Paragraphs separated by runs of 2-5 newlines, some CRLF, whitespace-only and unicode lines."""
  out = []
  for i in range(n_docs):
    lines = [' '.join(rng.choice(WORDS[:20] + ['café'], size=rng.integers(1, 40)))
             for _ in range(rng.integers(1, 4))]
    out.append('\n'.join(lines))
    out.append(['\n\n', '\n\n\n', '\n\n\n\n', '\n\n\n\n\n', '\r\n\r\n', '\n  \n\n'][i % 6])
  return ''.join(out)


def test_cuts_never_change_the_paragraphs(tmp_path):
  rng = np.random.default_rng(0)
  for trial in range(4):
    text = messy_text(rng, 60) + '\n' * trial
    path = tmp_path / f'm{trial}.txt'
    path.write_bytes(text.encode())
    whole = [p for p in text.replace('\r\n', '\n').split('\n\n') if p]
    for unit_bytes in (1, 37, 200, 10 ** 6):
      units = documents.file_units([str(path)], unit_bytes=unit_bytes)
      assert units[0].start == 0 and units[-1].end == len(text.encode())
      assert all(a.end == b.start for a, b in zip(units, units[1:]))
      got = [d for u in units for batch in documents.unit_documents(u) for d in batch]
      assert got == whole, (trial, unit_bytes)
      if unit_bytes == 37:
        assert len(units) > 30  # really split, including at odd and even newline runs
