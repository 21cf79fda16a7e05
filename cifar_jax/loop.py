"""The host side of a run: a flat loop over epochs and calls of the compiled Program, and the actions the
host runs between calls.

An action is a plain object with `due(step)` (does it act once `step` steps are done?) and
`__call__(run)`; `start(run)` runs once before the first call. Before each call the loop asks every action
whether it is due at the steps the call would cover, so a call of several steps ends where one is; after
the call, the actions due at its last step run in the order of the list (`default_actions`). Callers
(tests, later features) pass more actions to `train.train_and_evaluate(..., actions=[...])`; they run
after the default ones. A SIGTERM or Ctrl-C (`preemption.StopRequest`) is honoured after the actions of
the call it arrived in (`preempt`), so the checkpoint it writes holds what they did (an SWA update).
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cifar_jax import calibration
from cifar_jax import checkpointing
from cifar_jax import ema as ema_lib
from cifar_jax import metrics_writer
from cifar_jax import parallel
from cifar_jax import preemption
from cifar_jax import program as program_lib
from cifar_jax import steps
from cifar_jax import swag
from cifar_jax.errors import NonFiniteLossError


@dataclasses.dataclass
class Run:
  """What the loop and its actions share: the config, the Program, the state, and where outputs go."""

  config: ml_collections.ConfigDict
  workdir: str
  program: program_lib.Program
  state: steps.TrainState
  acc: Any  # the epoch's running metric sums, on the devices
  checkpoints: checkpointing.CheckpointWriter
  writer: metrics_writer.MetricsWriter | None
  plateaus: list | None
  start_step: int
  elapsed_before: float = 0.0  # seconds the run had trained before this process resumed it
  startup_seconds: float = 0.0  # from the process's start (or the call's) to the first step
  stop: preemption.StopRequest = dataclasses.field(default_factory=preemption.StopRequest)
  step: int = 0  # steps done
  saved_step: int = -1  # the step of the last checkpoint written by this process
  run_start: float = 0.0
  # The current epoch: its permutation, start time, progress bar, images counted before it, and its
  # train summary once its last step is done (EpochSummary).
  perm: Any = None
  epoch_start: float = 0.0
  bar: metrics_writer.ProgressBar | None = None
  count_before: float = 0.0
  epoch_train: dict = dataclasses.field(default_factory=dict)

  @property
  def par(self) -> parallel.Parallel:
    return self.program.par

  @property
  def steps_per_epoch(self) -> int:
    return self.program.steps_per_epoch

  @property
  def epoch(self) -> int:
    """The epoch the last step belongs to."""
    return (self.step - 1) // self.steps_per_epoch

  @property
  def num_seeds(self) -> int:
    return self.config.num_seeds

  def host_acc(self):
    return self.par.host(self.acc)

  def check_finite(self, host_acc=None) -> None:
    """Stops the run (NonFiniteLossError) when a loss or the params became NaN or infinite."""
    check_finite(self.host_acc() if host_acc is None else host_acc, self.config, self.steps_per_epoch)

  def save(self) -> None:
    """Checkpoints the state, the epoch's metric sums and the host state at this step (written in the
    background: `checkpoints.wait()` for it to be committed)."""
    self.checkpoints.save(
        self.par.to_checkpoint_layout(self.state), self.par.to_checkpoint_layout(self.acc),
        checkpointing.host_extra(self.plateaus, time.perf_counter() - self.run_start))
    self.saved_step = self.step

  def begin_epoch(self, epoch: int) -> None:
    self.perm = self.program.epoch_permutation(epoch)
    spe = self.steps_per_epoch
    self.count_before = float(np.sum(self.host_acc()['count']))  # every seed's images
    self.epoch_start = time.perf_counter()
    self.bar = metrics_writer.ProgressBar(
        spe, self.step - epoch * spe, epoch, self.config.num_epochs,
        self.config.batch_size * self.num_seeds, self.config.progress_bar and self.par.is_main_process)


def run_loop(run: Run, actions: list) -> None:
  """Trains from `run.start_step` to the end, running `actions` between the Program's calls."""
  spe, config = run.steps_per_epoch, run.config
  run.step = run.start_step
  with run.stop:
    run.run_start = time.perf_counter() - run.elapsed_before
    for action in actions:
      action.start(run)
    for epoch in range(run.start_step // spe, config.num_epochs):
      run.begin_epoch(epoch)
      while run.step < (epoch + 1) * spe:
        run.state, run.acc, k = run.program.train_call(
            run.state, run.acc, run.perm, run.step,
            lambda step: any(action.due(step) for action in actions))
        run.step += k
        for action in actions:
          if action.due(run.step):
            action(run)
        if run.stop.signum is not None:  # after the actions: a due SWA update is in the checkpoint
          preempt(run)


# Actions -------------------------------------------------------------------------------------------------


class Action:
  """Something the host does between calls: `due(step)` says after which steps, `__call__` does it."""

  def start(self, run: Run) -> None:
    del run

  def due(self, step: int) -> bool:
    raise NotImplementedError

  def __call__(self, run: Run) -> None:
    raise NotImplementedError


class EpochSummary(Action):
  """At an epoch's end: the train loss and accuracy, the finite check, images/s; closes the bar."""

  def __init__(self, steps_per_epoch: int):
    self.steps_per_epoch = steps_per_epoch

  def due(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0

  def __call__(self, run: Run) -> None:
    host_acc = run.host_acc()
    train = steps.seed_summaries(host_acc, run.num_seeds)
    run.check_finite(host_acc)
    seconds = time.perf_counter() - run.epoch_start
    # The global batches, all devices and all seeds together.
    images = float(np.sum(host_acc['count'])) - run.count_before
    run.epoch_train = {'summaries': train, 'seconds': seconds, 'images': images}
    run.bar.update(steps.mean_summary(train), self.steps_per_epoch, seconds)
    run.bar.close()


class SwaUpdate(Action):
  """Folds the params into the SWA average: every `swa.update_every_steps` steps after swa.start_epoch,
  or (0) at the end of every epoch from swa.start_epoch on."""

  def __init__(self, swa_config: ml_collections.ConfigDict, steps_per_epoch: int):
    self.start_step = swa_config.start_epoch * steps_per_epoch
    self.every = swa_config.update_every_steps or steps_per_epoch
    self.first = self.start_step + (swa_config.update_every_steps or steps_per_epoch)

  def due(self, step: int) -> bool:
    return step >= self.first and (step - self.start_step) % self.every == 0

  def __call__(self, run: Run) -> None:
    run.state = run.program.swa_update(run.state)


class ProgressLog(Action):
  """Every `log_every_steps` steps of an epoch (not at its end): the finite check and the progress bar."""

  def __init__(self, log_every_steps: int, steps_per_epoch: int):
    self.every, self.steps_per_epoch = log_every_steps, steps_per_epoch

  def due(self, step: int) -> bool:
    done = step % self.steps_per_epoch
    return bool(self.every and done and done % self.every == 0)

  def __call__(self, run: Run) -> None:
    host_acc = run.host_acc()
    run.check_finite(host_acc)
    summary = steps.mean_summary(steps.seed_summaries(host_acc, run.num_seeds))
    run.bar.update(summary, run.step % self.steps_per_epoch, time.perf_counter() - run.epoch_start)


class PeriodicCheckpoint(Action):
  """Every `checkpoint_every_steps` steps (not at an epoch's end, which EndOfEpoch checkpoints)."""

  def __init__(self, checkpoint_every_steps: int, steps_per_epoch: int):
    self.every, self.steps_per_epoch = checkpoint_every_steps, steps_per_epoch

  def due(self, step: int) -> bool:
    return bool(self.every and step % self.every == 0 and step % self.steps_per_epoch)

  def __call__(self, run: Run) -> None:
    run.check_finite()
    run.save()


class EndOfEpoch(Action):
  """Evaluation (and the EMA's, the recalibrated SWA model's), the metrics record, ReduceLROnPlateau, a
  checkpoint."""

  def __init__(self, config: ml_collections.ConfigDict, steps_per_epoch: int):
    self.config, self.steps_per_epoch = config, steps_per_epoch

  def due(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0

  def __call__(self, run: Run) -> None:
    config, epoch, k = self.config, run.epoch, run.num_seeds
    record = {'epoch': epoch + 1, 'step': run.step}
    train = run.epoch_train['summaries']
    record.update(**steps.seed_metrics('train_loss', [t['loss'] for t in train]),
                  **steps.seed_metrics('train_accuracy', [t['accuracy'] for t in train]))
    sums, ensemble, _ = run.program.evaluate_members(run.state)
    ev = steps.seed_summaries(run.par.host(sums), k)
    record.update(**steps.seed_metrics('eval_loss', [e['loss'] for e in ev]),
                  **steps.seed_metrics('eval_accuracy', [e['accuracy'] for e in ev]),
                  **calibration_record('eval', 'ensemble_eval', run.par.host(sums), ensemble, k))
    hyper = run.par.host(run.state.opt_state.hyperparams)
    lrs = np.asarray(hyper['learning_rate'], np.float64).reshape(-1).tolist()
    record['learning_rate'] = lrs[0]  # the same for every seed unless ReduceLROnPlateau
    record['momentum'] = float(np.asarray(hyper['momentum']).reshape(-1)[0])
    record['images_per_second'] = run.epoch_train['images'] / run.epoch_train['seconds']
    record['elapsed_seconds'] = time.perf_counter() - run.run_start
    if run.plateaus is not None and k > 1:
      record['learning_rate_per_seed'] = lrs
    if ema_lib.enabled(config):
      record.update(ema_record(run))
    if config.swa.enabled and epoch >= config.swa.start_epoch:
      record.update(self._swa_record(run, epoch))
    if epoch == run.start_step // self.steps_per_epoch:
      record['compile_seconds'] = run.program.compile_seconds
      record['startup_seconds'] = run.startup_seconds
    if run.writer is not None:
      run.writer.write(record)
    if run.plateaus is not None:
      lr = [p.step(e['loss']) for p, e in zip(run.plateaus, ev)]
      run.state = set_learning_rate(run.state, run.par.place_per_seed(
          steps.per_seed([np.float32(x) for x in lr])))
    run.acc = run.par.place_per_seed(steps.per_seed([steps.init_train_metrics()] * k))
    run.save()

  def _swa_record(self, run: Run, epoch: int) -> dict:
    """The SWA model's eval metrics (recalibrated first) when due, and the number of models averaged."""
    record = {}
    if self.config.swa.eval_every_epoch or epoch + 1 == self.config.num_epochs:
      run.state = run.program.recalibrate_swa(run.state, epoch)
      sums, ensemble, _ = run.program.evaluate_members(run.state, use_swa=True)
      swa_ev = steps.seed_summaries(run.par.host(sums), run.num_seeds)
      record.update(**steps.seed_metrics('swa_eval_loss', [e['loss'] for e in swa_ev]),
                    **steps.seed_metrics('swa_eval_accuracy', [e['accuracy'] for e in swa_ev]),
                    **calibration_record('swa_eval', 'swa_ensemble_eval', run.par.host(sums), ensemble,
                                        run.num_seeds))
    record['swa_count'] = checkpointing.scalar(run.par.host(run.state.swa_count))
    if self.config.swag.enabled and epoch + 1 == self.config.num_epochs:
      swag.log_divisor(record['swa_count'], self.config.swag.rank)
      sums, ensemble, _ = run.program.swag_evaluate(run.state, epoch, self.config.swag.num_samples)
      record.update(swag_record(run.par.host(sums), ensemble, run.num_seeds))
    return record


def ema_record(run: Run) -> dict:
  """ema_eval_* of the weights' moving average (loss, accuracy, ece, brier; per seed with several) and,
  with seeds, ema_ensemble_eval_* of their ensemble."""
  sums, ensemble, _ = run.program.evaluate_members(run.state, use_ema=True)
  ev = steps.seed_summaries(run.par.host(sums), run.num_seeds)
  return {**steps.seed_metrics('ema_eval_loss', [e['loss'] for e in ev]),
          **steps.seed_metrics('ema_eval_accuracy', [e['accuracy'] for e in ev]),
          **calibration_record('ema_eval', 'ema_ensemble_eval', run.par.host(sums), ensemble, run.num_seeds)}


def calibration_record(prefix: str, ensemble_prefix: str, sums, ensemble_sums, num_seeds: int) -> dict:
  """{prefix}_ece, _brier of each seed's eval sums (its NLL is {prefix}_loss); with seeds, the ensemble's
  metrics as {ensemble_prefix}_* (accuracy, nll, ece, brier, member_nll, disagreement)."""
  members = steps.seed_calibration(sums, num_seeds)
  record = {}
  for key in ('ece', 'brier'):
    record.update(steps.seed_metrics(f'{prefix}_{key}', [m[key] for m in members]))
  if ensemble_sums is not None:
    record.update({f'{ensemble_prefix}_{k}': v for k, v in calibration.summarize(ensemble_sums).items()})
  return record


def swag_record(sums, ensemble_sums, num_seeds: int) -> dict:
  """swag_eval_* (accuracy, nll, ece, brier) of each seed's SWAG average; multiswag_eval_* over seeds."""
  record = {}
  members = steps.seed_calibration(sums, num_seeds)
  for key in ('accuracy', 'nll', 'ece', 'brier'):
    record.update(steps.seed_metrics(f'swag_eval_{key}', [m[key] for m in members]))
  if ensemble_sums is not None:
    record.update({f'multiswag_eval_{k}': v for k, v in calibration.summarize(ensemble_sums).items()})
  return record


def default_actions(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[Action]:
  """The actions of every run, in the order they run after a call."""
  spe = steps_per_epoch
  actions = [EpochSummary(spe)]
  if config.swa.enabled:
    actions.append(SwaUpdate(config.swa, spe))
  return actions + [ProgressLog(config.log_every_steps, spe),
                    PeriodicCheckpoint(config.checkpoint_every_steps, spe),
                    EndOfEpoch(config, spe)]


def preempt(run: Run) -> None:
  """SIGTERM or Ctrl-C arrived (`preemption.StopRequest`): checkpoint this step (unless an action just
  did) and stop with `Preempted`, unless this was the run's last step."""
  if run.saved_step != run.step:
    run.check_finite()
    run.save()
  run.checkpoints.wait()  # Preempted says the checkpoint is there: it must be committed
  if run.step < run.config.num_epochs * run.steps_per_epoch:
    raise preemption.Preempted(run.stop.signum, run.step, run.workdir)


# Host helpers ----------------------------------------------------------------------------------------------


def set_learning_rate(state: steps.TrainState, lr) -> steps.TrainState:
  """Writes a host-chosen lr (ReduceLROnPlateau) into the injected hyperparameters."""
  hyperparams = dict(state.opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def check_finite(acc, config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  bad_steps = np.asarray(jax.device_get(acc['nonfinite_step'])).reshape(-1)
  if np.any(bad_steps >= 0) and config.halt_on_nan:
    index = int(np.argmax(bad_steps >= 0))
    bad = int(bad_steps[index])
    which = f' in seed {config.seed + index}' if bad_steps.size > 1 else ''
    raise NonFiniteLossError(
        f'non-finite training loss or parameters at step {bad + 1} '
        f'(epoch {bad // steps_per_epoch + 1}){which}; the last '
        'good checkpoint is kept. Lower optimizer.lr or set halt_on_nan=False to continue anyway.')

