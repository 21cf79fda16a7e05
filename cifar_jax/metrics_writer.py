"""Per-epoch metrics to metrics.jsonl and TensorBoard, and the terminal progress bar."""

import json
import os

from absl import logging
import tqdm

METRICS_FILE = 'metrics.jsonl'
# Record keys measured in seconds or per second: they differ between runs that train the same bits.
TIMING_KEYS = ('images_per_second', 'elapsed_seconds', 'compile_seconds', 'startup_seconds')


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Appends one JSON object per epoch (floats at full precision) and mirrors scalars to TensorBoard.

  On a resume, records after `truncate_after_step` (written after the checkpoint that was restored) are
  dropped so the file reads as if the run had never stopped.
  """

  def __init__(self, workdir: str, truncate_after_step: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    kept = [r for r in read_metrics(workdir) if r.get('step', 0) <= truncate_after_step]
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(tmp, self.path)
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
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
      f.flush()
      os.fsync(f.fileno())
    tb = self._tensorboard_writer()
    if tb is not None:
      for key, value in record.items():
        if key not in ('epoch', 'step') and isinstance(value, (int, float)):
          tb.add_scalar(key, value, record['step'])
      tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


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
