"""What a run says before its first step: the train step's planned memory (and a refusal, one line and
exit status 2, when it cannot fit), and a warning for a schedule whose warm-up or milestones lie beyond
the run's last step."""

import logging as pylogging
import os

import pytest
import test_errors

from cifar_jax import config_lib
from cifar_jax import memory
from cifar_jax import train
from configs import default
from configs import finetune_efficientnet_lite0
from configs import finetune_resnet50_bit
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')
cli = test_errors.cli  # the command line in-process: (exit status, stderr)

# The train step's memory ------------------------------------------------------------------------------


def test_a_step_that_cannot_fit_stops_before_the_first_step(cli, monkeypatch, tmp_path):
  """The available memory read through `memory.available_bytes`, here 5 MB: the tiny ResNet9's step
  plans more, so the run stops after compiling its first train call, with one line naming the need, what
  is available and a setting, having written no checkpoint, metrics nor config.json."""
  monkeypatch.setattr(memory, 'available_bytes', lambda device=None: (5_000_000, 'MemAvailable'))
  workdir = tmp_path / 'run'
  result = cli(config=TINY, workdir=str(workdir))
  line = test_errors.assert_user_error(result, 'the train step needs', 'batch_size=64 in 1 micro-batch of 64',
                                       'MB is available (MemAvailable')
  assert '--config.optimizer.micro_batches=' in line or 'micro-batches of one example' in line, line
  assert not any((workdir / 'checkpoints').iterdir())  # the checkpoint manager's folder, empty
  assert not (workdir / 'metrics.jsonl').exists() and not (workdir / 'config.json').exists()


@pytest.mark.parametrize('override, fragments', [
    ('--config.optimizer.micro_batches=3', ('optimizer.micro_batches=3 does not divide batch_size=64',
                                            'such as 2 or 4')),
    ('--config.optimizer.micro_batches=0', ('optimizer.micro_batches must be an integer >= 1', 'got 0')),
])
def test_bad_micro_batches_on_the_command_line(cli, override, fragments):
  test_errors.assert_user_error(cli(override, config=TINY), *fragments)


def test_the_plan_is_logged_and_a_step_that_fits_runs(caplog, tmp_path):
  """With the machine's own memory the tiny run trains, having logged its plan once."""
  caplog.set_level(pylogging.INFO, logger='absl')
  config = tiny.get_config()
  config.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  lines = [m for m in caplog.messages if m.startswith('Train step memory: ')]
  assert len(lines) == 1 and ' planned (temp ' in lines[0] and ' available (' in lines[0], lines


def test_the_refusal_names_the_micro_batches_that_fit():
  """issue 31's case in numbers: a 34 GB temporary buffer (the activations of batch 512) on a machine
  with 21.9 GB available: 2 micro-batches are estimated at 17 + 1 + 0.1 GB, within 90 %."""
  plan = memory.StepMemory(temp=34_200_000_000, arguments=1_000_000_000, outputs=50_000_000,
                           alias=50_000_000, code=0)
  with pytest.raises(config_lib.ConfigError) as error:
    memory.check(plan, batch_size=512, micro_batches=1, data_devices=1, params_bytes=14_000_000,
                 available=(21_900_000_000, 'MemAvailable'))
  message = str(error.value)
  for fragment in ('the train step needs 35.2 GB', '21.9 GB is available (MemAvailable',
                   '--config.optimizer.micro_batches=2 (about 18.1 GB)', '--config.batch_size=256'):
    assert fragment in message, message
  # the same plan already in 4 micro-batches of 128: 8 are estimated at 18.1 GB, 16 at 9.6
  assert memory.fitting_micro_batches(plan, 0.9 * 15e9, batch_size=512, micro_batches=4,
                                      data_devices=4) == 16
  # 256 micro-batches (1.5 GB) fit one device, but their 2 examples do not split over 4
  fits = lambda devices: memory.fitting_micro_batches(plan, 1.71e9, batch_size=512, micro_batches=4,
                                                      data_devices=devices)
  assert (fits(1), fits(4)) == (256, None)
  # nothing fits: a micro-batch of one example a device is still over
  with pytest.raises(config_lib.ConfigError, match='even micro-batches of one example a device would need'):
    memory.check(plan, batch_size=512, micro_batches=1, data_devices=1, available=(900_000_000, 'test'))
  memory.check(plan, batch_size=512, micro_batches=1, data_devices=1, available=(40e9, 'test'))  # fits


# Schedules beyond the run -----------------------------------------------------------------------------


def test_a_warm_up_longer_than_the_run_warns_with_the_numbers(monkeypatch):
  """issue 31: the Lite0 config with --config.num_epochs=2 on 5,000 images (10 steps an epoch of 512):
  its 500 warm-up steps are longer than the 20 steps of the run."""
  config = finetune_efficientnet_lite0.get_config()
  config.num_epochs = 2
  warnings = []
  monkeypatch.setattr(config_lib.logging, 'warning', lambda fmt, *args: warnings.append(fmt % args))
  config_lib.validate_against_run(config, steps_per_epoch=10)
  assert warnings == [
      'schedule warmup_cosine: warm-up of 500 steps is longer than the run (20 steps): the learning rate '
      'never leaves the warm-up; shorten it with --config.schedule.warmup_steps=1 (5% of the run)']
  config.schedule.warmup_steps = 1  # as the warning says: nothing more to say
  assert config_lib.schedule_warnings(config, 10) == []


@pytest.mark.parametrize('name, changes, fragments', [
    ('warmup_cosine', dict(warmup_steps=40), ('warm-up of 40 steps', 'run (40 steps)', 'warmup_steps=2')),
    ('bit_hyperrule', dict(dataset_size=50_000), ('warm-up of 500 steps', 'name=warmup_cosine')),
    ('multistep', dict(warmup_epochs=2), ('linear warm-up of 2 epochs', 'warmup_epochs=1')),
    ('step', dict(step_size=30), ('step_size=30 epochs', 'never decays', 'step_size=1')),
    ('cosine', dict(T_max=50), ('T_max=50 epochs', 'T_max=-1')),
    ('warm_restarts', dict(T_0=20), ('T_0=20 epochs', 'never restarts', 'T_0=1')),
    ('one_cycle', dict(total_steps=1000), ('total_steps=1000 steps', 'nor reaches its peak')),
    ('cyclic', dict(step_size_up=2000), ('step_size_up=2000 steps', 'never reaches max_lr')),
    ('plateau', dict(patience=10), ('patience=10 epochs', 'never reduced')),
])
def test_each_schedule_beyond_a_short_run_warns(name, changes, fragments):
  """A 2-epoch run of 20 steps an epoch (40 steps): each schedule's warm-up, decay, period or cycle set
  beyond it is one line with its numbers."""
  config = default.get_config()
  config.num_epochs = 2
  config.schedule.name = name
  for field, value in changes.items():
    setattr(config.schedule, field, value)
  config_lib.validate(config)
  warnings = config_lib.schedule_warnings(config, 20)
  assert len(warnings) == 1, warnings
  for fragment in fragments:
    assert fragment in warnings[0], warnings[0]


def test_swalr_anneal_longer_than_the_swa_phase_warns():
  config = default.get_config()
  config.num_epochs, config.swa.enabled, config.swa.start_epoch = 10, True, 8
  config.swa.schedule, config.swa.anneal_epochs = 'swa_lr', 5
  config.schedule.milestones = (3,)
  config_lib.validate(config)
  assert config_lib.schedule_warnings(config, 20) == [
      'swa.schedule=swa_lr: the anneal of swa.anneal_epochs=5 epochs is longer than the SWA phase (2 '
      'epochs): the learning rate never reaches swa.lr; shorten it with --config.swa.anneal_epochs=2']


@pytest.mark.parametrize('module', [finetune_efficientnet_lite0, finetune_resnet50_bit])
def test_the_fine_tuning_configs_fit_their_own_length(module):
  """At their own length on CIFAR-10's 50,000 images (98 steps an epoch of 512) nothing is beyond."""
  config = module.get_config()
  assert config_lib.schedule_warnings(config, 98) == []
