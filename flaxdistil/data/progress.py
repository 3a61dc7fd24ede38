"""The package's one progress-bar style: tqdm with ETA on stderr, shown only to a person.

Tokenisation (`corpus.build_token_shards`, per unit), training (`training/train_log.TrainLog`, per
step) and teacher-cache builds (`cache_teacher.build`, per row) show the same bar. It lives in the
lowest wing that draws one. A bar is drawn only on process 0 and only when stderr is a terminal
(tqdm's `disable=None`), so CI logs, test output and `log.txt` get log lines alone;
`flaxdistil/console.py` writes log lines through `tqdm.write`, so they scroll above a live bar.
`TQDM_DISABLE=1` turns bars off in a terminal too.
"""

import tqdm


def progress_bar(total: int, desc: str, unit: str, initial: int = 0) -> tqdm.tqdm:
  """A tqdm bar with rate and ETA, or a disabled one (no terminal, or not process 0).

  Args:
    total: the count at completion.
    desc: what is counted, shown left of the bar ('tokenise', 'train', 'teacher cache').
    unit: the unit of `total` ('unit', 'step', 'row').
    initial: the count already done (a resumed run or build).

  Returns:
    The `tqdm.tqdm` bar (`update(n)`, `set_postfix_str`, `close()`; a disabled bar ignores them).
  """
  import jax  # pylint: disable=g-import-not-at-top  (tokenisation workers import this module)
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                   leave=False, disable=None if jax.process_index() == 0 else True)
