"""Per-epoch metrics to metrics.jsonl and TensorBoard, and the terminal progress bar."""

import json
import os

from absl import logging
import tqdm

from cifar_jax import errors

METRICS_FILE = 'metrics.jsonl'
# Record keys measured in seconds or per second: they differ between runs that train the same bits.
TIMING_KEYS = ('images_per_second', 'elapsed_seconds', 'compile_seconds', 'startup_seconds')


def read_records(path: str) -> tuple[list[dict], str | None]:
  """The records of a metrics.jsonl file, and its last line when a kill cut it short (else None).

  Each record is one line written by one append, so a process killed (or a disk filled) mid-write leaves
  at most a partial last line, which every reader (the trainer, plot_history.py, sweep.py,
  compare_frameworks.py) leaves out. A damaged line before the last is no kill's doing: ValueError.
  """
  if not os.path.exists(path):
    return [], None
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = [(i + 1, line) for i, line in enumerate(f) if line.strip(' \t\r\n\x00')]
  records = []
  for number, line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict):
      records.append(record)
    elif number == lines[-1][0]:
      return records, line.rstrip('\n')
    else:
      raise ValueError(f'{path}: line {number} is not a JSON record ({line[:60]!r}); remove it')
  return records, None


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order (a last line cut short by a kill left out)."""
  return read_records(os.path.join(workdir, METRICS_FILE))[0]


class MetricsWriter:
  """Appends one JSON object per epoch (floats at full precision) and mirrors scalars to TensorBoard.

  On a resume, records after `truncate_after_step` (written after the checkpoint that was restored) are
  dropped so the file reads as if the run had never stopped, and so is a last line cut short by a kill
  (with a warning). A failed write raises WriteError.
  """

  def __init__(self, workdir: str, truncate_after_step: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    records, partial = read_records(self.path)
    if partial is not None:
      logging.warning('%s: dropped its last line, cut short when the run was stopped while writing it '
                      '(%r)', self.path, partial[:80])
    kept = [r for r in records if r.get('step', 0) <= truncate_after_step]
    tmp = self.path + '.tmp'
    try:
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(tmp, self.path)
    except OSError as e:
      raise _write_error('the metrics', self.path, e) from e
    self._tensorboard = tensorboard
    self._tb = None

  def _tensorboard_writer(self):
    """TensorBoard's writer, made at the first write: importing tensorboardX takes seconds, which the
    run's start-up does not need to pay."""
    if self._tensorboard and self._tb is None:
      self._tensorboard = False
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError:  # a machine without it (pip install tensorboardX): metrics.jsonl is the record
        logging.warning('tensorboardX is not installed: no TensorBoard events, metrics.jsonl only.')
      else:
        self._tb = SummaryWriter(os.path.join(os.path.dirname(self.path), 'tensorboard'))
    return self._tb

  def write(self, record: dict) -> None:
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')  # one write: a kill leaves at most a partial last line
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      raise _write_error(f'the metrics of epoch {record.get("epoch")}', self.path, e) from e
    tb = self._tensorboard_writer()
    if tb is not None:
      try:
        for key, value in record.items():
          if key not in ('epoch', 'step') and isinstance(value, (int, float)):
            tb.add_scalar(key, value, record['step'])
        tb.flush()
      except OSError as e:
        raise _write_error('the TensorBoard events', os.path.dirname(self.path), e) from e

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _write_error(what: str, where: str, error: OSError) -> errors.WriteError:
  return errors.write_error(what, where, error, 'free space or fix the disk, then run the same command to '
                            'resume from the last checkpoint')


class ProgressBar:
  """A tqdm bar over the steps of one epoch, showing loss, accuracy and images per second."""

  def __init__(self, total: int, initial: int, epoch: int, num_epochs: int, batch_size: int,
               enabled: bool = True):
    self._initial = initial
    self._batch_size = batch_size
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=f'epoch {epoch + 1}/{num_epochs}',
                          unit='step', disable=not enabled, leave=True, dynamic_ncols=True)

  def update(self, summary: dict, position: int, seconds: float) -> None:
    """Moves to `position` steps and shows the running loss and accuracy."""
    self._bar.update(position - self._bar.n)
    postfix = {'loss': f"{summary['loss']:.4f}", 'acc': f"{summary['accuracy']:.3f}"}
    if seconds > 0:
      postfix['img/s'] = f'{(position - self._initial) * self._batch_size / seconds:.0f}'
    self._bar.set_postfix(postfix, refresh=True)

  def close(self) -> None:
    self._bar.close()
