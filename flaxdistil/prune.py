r"""Prune a trained student's attention heads and FFN neurons, recover by distillation, export.

  python -m flaxdistil.prune --workdir runs/wiki_a --out runs/wiki_a_pruned50 \
      --heads 0.5 --ffn 0.3 [--recovery_steps 200] [--importance_batches 8] [--onnx]

Michel et al. (2019), "Are Sixteen Heads Really Better than One?": the importance of every head
and FFN neuron is the mean |dL/dxi| of a gate xi = 1 on its output, L the run's own distillation
objective against its teacher, on held-out batches (`training/importance.py`); the `--heads`
fraction of heads of lowest (per-layer l2-normalised) importance goes, globally, one head per
layer at least, and the `--ffn` fraction of each layer's neurons (`model/pruning.py`). Then a
short distillation from the same teacher (the run's config, `--recovery_steps` steps) recovers.

Reads `<workdir>/config.json` and the checkpoint (run it from the directory the run was started
in: the config's paths are relative to it). Writes, under `--out`:

  pruned/          the pruned student as a checkpoint (the source step), for `scripts/evaluate.py`
                   and `python -m flaxdistil.export`
  pruned_hf/       its verified Hugging Face export (`export/hf_export.py`), the recovery's init
  recovery/        the recovery run (a normal workdir: rerunning the command resumes it)
  recovered_hf/    the recovered student's verified export (with `--onnx`: onnx/ inside)
  prune_report.json  importances, removed heads, FFN width, parameters, held-out metrics of the
                   source, pruned and recovered student (the run's eval set)

Each step whose output exists is skipped, so a rerun after a kill continues where it stopped.
Exit code 2 with `error: ...` on bad input.
"""

import dataclasses
import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from flaxdistil import cli
from flaxdistil import console
from flaxdistil.export import hf_export
from flaxdistil.model import bert
from flaxdistil.model import pruning
from flaxdistil.storage import atomic
from flaxdistil.training import checkpointing
from flaxdistil.training import evaluation
from flaxdistil.training import importance as importance_lib
from flaxdistil.training import setup
from flaxdistil.training import train

FLAGS = flags.FLAGS
REPORT = 'prune_report.json'
IMPORTANCE_DATA = ('eval', 'train')


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`, written by the train loop).

  Raises:
    FileNotFoundError: the workdir has no config.json (not a training run).
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist; --workdir must be a training run directory '
                            '(python -m flaxdistil.main writes config.json there).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _strip(cfg: bert.ModelConfig) -> dict:
  """The fingerprint form of a config (as `setup.build_run` records it)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ('dtype', 'remat')}


def _scores(cfg: bert.ModelConfig, params, batches, max_pred: int, reference=None) -> dict:
  """Held-out metrics of one model on `batches` (the run's eval set, scored as the train loop's
  evaluator does: MLM heads on at most `max_pred` masked positions per row), with `_top1`."""
  model = bert.MaskedLM(dataclasses.replace(cfg, remat=False))
  if cfg.num_labels:
    step = evaluation.make_task_eval_step(model)
  elif cfg.with_mlm_head:
    step = evaluation.make_eval_step(model, max_pred)
  else:
    return {}
  return evaluation.evaluate(jax.jit(step), params, batches, reference)


def _public(res: dict) -> dict:
  return {k: v for k, v in res.items() if not k.startswith('_')}


def _importance_batches(run: setup.Run, source: str, n: int) -> list:
  """The first `n` global batches of the run's eval set, or of its training stream."""
  if source == 'eval':
    batches = run.eval_batches()[:n]
  else:
    it = run.train_batches(0)
    try:
      batches = [next(it) for _ in range(n)]
    finally:
      it.close()
  if not batches:
    raise ValueError(f'The run has no {source} batches for importance; use '
                     f'--importance_data={"train" if source == "eval" else "eval"}.')
  return batches


def prune_step(workdir: str, out: str, *, heads: float, ffn: float, step: int | None = None,
               importance_batches: int = 8, importance_data: str = 'eval') -> dict:
  """Importance, selection, removal: writes `out/pruned` (checkpoint) and `out/pruned_hf`.

  Args:
    workdir: the trained run.
    out: the output root.
    heads: fraction of the heads to remove, in [0, 1).
    ffn: fraction of each layer's FFN neurons to remove, in [0, 1).
    step: checkpoint step of `workdir`; None = the newest.
    importance_batches: batches the importance is averaged over.
    importance_data: 'eval' (the run's held-out set) or 'train' (its first training batches;
      for a GLUE run, whose eval set is the dev set you report on).

  Returns:
    The report: source step, importances, removed heads (original indices per layer), FFN
    width, parameter counts, held-out metrics of source and pruned model, export check.

  Raises:
    FileNotFoundError: no config.json or checkpoint in `workdir`.
    ValueError: a fraction outside [0, 1), an unknown `importance_data`, a config that does
      not describe the checkpoint, or a failed export verification.
    ConfigError: the run's config cannot be rebuilt (paths moved, ...).
  """
  if importance_data not in IMPORTANCE_DATA:
    raise ValueError(f'--importance_data={importance_data!r}: use one of {IMPORTANCE_DATA}.')
  for name, value in (('heads', heads), ('ffn', ffn)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f'--{name}={value}: the fraction to prune must be in [0, 1).')
  config = load_run_config(workdir)
  config.teacher.cache = ''  # importance and recovery run the teacher online
  scfg, params, meta, src_step = checkpointing.load_student(workdir, step)
  run = setup.build_run(config, os.path.join(out, 'build'))
  rs = run.student_config
  if (rs.hidden_size, rs.num_hidden_layers, rs.num_labels) != (
      scfg.hidden_size, scfg.num_hidden_layers, scfg.num_labels):
    raise ValueError(f'{workdir}/config.json describes a {rs.num_hidden_layers} x {rs.hidden_size} '
                     f'student, the checkpoint a {scfg.num_hidden_layers} x {scfg.hidden_size} one; '
                     'the directory mixes two runs.')
  batches = _importance_batches(run, importance_data, importance_batches)
  logging.info('Importance over %d %s batches ...', len(batches), importance_data)
  imp = importance_lib.importance(scfg, params, run.teacher_model, run.teacher_params,
                                  run.objective, batches)
  remove = pruning.select_heads(imp['heads'], heads)
  keep = pruning.select_ffn(imp['ffn'], ffn) if ffn else None
  new_cfg, new_params = pruning.prune(params, scfg, remove, keep)
  eval_batches, max_pred = run.eval_batches(), run.objective.max_predictions_per_seq
  teacher = {}
  if run.teacher_config is not None:
    teacher = _scores(run.teacher_config, run.teacher_params, eval_batches, max_pred)
  ref = teacher.get('_top1')
  source_eval = _scores(scfg, params, eval_batches, max_pred, ref)
  pruned_eval = _scores(new_cfg, new_params, eval_batches, max_pred, ref)

  pruned_dir = os.path.join(out, 'pruned')
  shutil.rmtree(pruned_dir, ignore_errors=True)  # a killed earlier attempt: it is rebuilt exactly
  manager = checkpointing.make_manager(pruned_dir, max_to_keep=1, async_save=False)
  new_meta = dict(meta, fingerprint=dict(meta['fingerprint'], student_config=_strip(new_cfg)),
                  eval=_public(pruned_eval),
                  pruned_from={'workdir': os.path.abspath(workdir), 'step': src_step})
  checkpointing.save(manager, src_step, {'step': np.int32(src_step), 'params': new_params},
                     new_meta)
  manager.wait_until_finished()
  manager.close()
  export = hf_export.export(pruned_dir, os.path.join(out, 'pruned_hf'))
  return {
      'source': {'workdir': os.path.abspath(workdir), 'step': src_step},
      'fractions': {'heads': heads, 'ffn': ffn},
      'importance': {'data': importance_data, 'num_batches': imp['num_batches'],
                     'loss': imp['loss'], 'heads': [x.tolist() for x in imp['heads']],
                     'ffn_mean': [float(x.mean()) for x in imp['ffn']]},
      'pruned_heads': [list(h) for h in new_cfg.pruned_heads],
      'heads_per_layer': [new_cfg.layer_num_heads(i) for i in range(new_cfg.num_hidden_layers)],
      'intermediate_size': {'before': scfg.intermediate_size, 'after': new_cfg.intermediate_size},
      'params': {'before': bert.count_params(params), 'after': bert.count_params(new_params)},
      'eval': {'teacher': _public(teacher), 'source': _public(source_eval),
               'pruned': _public(pruned_eval)},
      'pruned_hf': export,
  }


def recovery_config(config: ml_collections.ConfigDict, pruned_hf: str, steps: int,
                    learning_rate: float = 0.0) -> ml_collections.ConfigDict:
  """The run's config, continued from the pruned export for `steps` steps.

  The student is `student.init='pretrained'` from `pruned_hf` (its shape, pruned heads included,
  is kept: the width fields are reset to 0), the teacher runs online, 10% warmup, evaluation at
  the end only.

  Args:
    config: the source run's config (`load_run_config`).
    pruned_hf: the pruned student's HF directory.
    steps: recovery steps (> 0).
    learning_rate: peak learning rate; 0 keeps the run's.

  Returns:
    A new ConfigDict.
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.student.init = 'pretrained'
  c.student.path = os.path.abspath(pruned_hf)
  for field in ('hidden_size', 'num_attention_heads', 'intermediate_size',
                'max_position_embeddings'):
    c.student[field] = 0
  c.teacher.cache = ''
  c.num_train_steps = steps
  c.steps_per_run = 0
  c.optim.warmup_steps = max(1, steps // 10)
  c.eval_every_steps = 0
  c.checkpoint_every_steps = min(c.checkpoint_every_steps, max(1, steps // 4))
  if learning_rate:
    c.optim.learning_rate = learning_rate
  return c


def prune_run(workdir: str, out: str, *, heads: float, ffn: float, step: int | None = None,
              importance_batches: int = 8, importance_data: str = 'eval',
              recovery_steps: int = 0, recovery_learning_rate: float = 0.0,
              onnx: bool = False) -> dict:
  """`prune_step`, then `recovery_steps` of distillation and the verified export of the result.

  Steps whose outputs exist in `out` are skipped (the recovery run resumes itself).

  Args:
    workdir / heads / ffn / step / importance_batches / importance_data: as `prune_step`.
    out: the output root (module docstring for its layout).
    recovery_steps: distillation steps after pruning; 0 = none (then `pruned_hf` is the result).
    recovery_learning_rate: its peak learning rate; 0 = the run's.
    onnx: also export ONNX (fp32 + int8) of the final model (`recovered_hf`, or `pruned_hf`).

  Returns:
    The report (also `out/prune_report.json`): `prune_step`'s, plus `recovery` (the run's
    summary) and `recovered_hf` (the export report).

  Raises:
    As `prune_step`; also a report in `out` from other settings (ValueError), and the train
    loop's and the export's errors.
  """
  os.makedirs(out, exist_ok=True)
  report_path = os.path.join(out, REPORT)
  report = None
  if os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
    asked = {'heads': heads, 'ffn': ffn}
    if report.get('fractions') != asked:
      raise ValueError(f'{out} holds a pruning with fractions {report.get("fractions")}, not '
                       f'{asked}; choose another --out.')
  if report is None or not os.path.isdir(os.path.join(out, 'pruned_hf')):
    report = prune_step(workdir, out, heads=heads, ffn=ffn, step=step,
                        importance_batches=importance_batches, importance_data=importance_data)
    atomic.write_json(report_path, report)
  final = os.path.join(out, 'pruned_hf')
  if recovery_steps:
    config = recovery_config(load_run_config(workdir), final, recovery_steps,
                             recovery_learning_rate)
    summary = train.train_and_evaluate(config, os.path.join(out, 'recovery'))
    report['recovery'] = {'steps': recovery_steps, 'summary': summary}
    report['eval']['recovered'] = summary.get('student', {})
    final = os.path.join(out, 'recovered_hf')
    if not os.path.isdir(final):
      report['recovered_hf'] = hf_export.export(os.path.join(out, 'recovery'), final, onnx=onnx)
  elif onnx and not os.path.isdir(os.path.join(final, 'onnx')):
    from flaxdistil.export import onnx_export  # pylint: disable=g-import-not-at-top
    report['onnx'] = onnx_export.export_onnx(final)
  atomic.write_json(report_path, report)
  return report


def _define_flags():
  """The CLI's flags, defined only when this module runs (`flaxdistil.main` defines `--workdir`)."""
  flags.DEFINE_string('workdir', None, 'The trained run (checkpoints/ and config.json).')
  flags.DEFINE_string('out', None, 'Output root (pruned/, pruned_hf/, recovery/, recovered_hf/).')
  flags.DEFINE_float('heads', 0.0, 'Fraction of all attention heads to remove, in [0, 1).')
  flags.DEFINE_float('ffn', 0.0, "Fraction of each layer's FFN neurons to remove, in [0, 1).")
  flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir; default: the newest.')
  flags.DEFINE_integer('importance_batches', 8, 'Batches the importance is averaged over.')
  flags.DEFINE_enum('importance_data', 'eval', list(IMPORTANCE_DATA),
                    "'eval': the run's held-out batches; 'train': its first training batches.")
  flags.DEFINE_integer('recovery_steps', 0, 'Distillation steps after pruning (0 = none).')
  flags.DEFINE_float('recovery_learning_rate', 0.0, "Recovery peak learning rate; 0 = the run's.")
  flags.DEFINE_bool('onnx', False, 'Also export ONNX fp32 + int8 of the final model.')


def main(argv):
  """Prunes `--workdir` into `--out` and prints the JSON report (`app.run`).

  Args:
    argv: the command line left after absl parsed its flags; only the program name is allowed.

  Raises:
    app.UsageError: positional arguments.
    SystemExit: code 2 on bad input (`error: ...` on stderr).
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.setup()  # clean console lines, library chatter filtered
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of the checks
  with cli.exit_on_error():
    try:
      report = prune_run(FLAGS.workdir, FLAGS.out, heads=FLAGS.heads, ffn=FLAGS.ffn,
                         step=FLAGS.step, importance_batches=FLAGS.importance_batches,
                         importance_data=FLAGS.importance_data,
                         recovery_steps=FLAGS.recovery_steps,
                         recovery_learning_rate=FLAGS.recovery_learning_rate, onnx=FLAGS.onnx)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  print(json.dumps({k: report.get(k) for k in ('fractions', 'heads_per_layer',
                                               'intermediate_size', 'params', 'eval')}))


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
