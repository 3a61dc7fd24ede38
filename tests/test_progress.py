"""flaxdistil.data.progress: bars for a person at a terminal, silence for logs and tests."""

import io

from flaxdistil.data import progress


def test_bar_is_off_when_stderr_is_no_terminal_and_counts_from_initial():
  bar = progress.progress_bar(10, 'train', 'step', initial=4)  # pytest captures stderr
  assert bar.disable
  bar.update(3)
  bar.close()
  bar.close()  # closing twice is harmless (the train loop's finally)


def test_bar_draws_rate_and_eta_on_a_terminal(monkeypatch):
  class Tty(io.StringIO):
    def isatty(self):
      return True
  out = Tty()
  monkeypatch.setattr('sys.stderr', out)
  bar = progress.progress_bar(10, 'tokenise', 'unit', initial=4)
  assert not bar.disable
  bar.update(2)
  bar.refresh()
  text = out.getvalue()
  bar.close()
  assert 'tokenise' in text and '6/10' in text and 'unit' in text and '<' in text  # ETA
