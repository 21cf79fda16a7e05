"""Train-step and eval throughput, compile time and peak memory: the JAX trainer vs the PyTorch reference.

  JAX_PLATFORMS=cpu python scripts/benchmark.py step --json=/tmp/bench.json
  python scripts/benchmark.py step --torch_modes=eager,channels_last,compile --dtype=bfloat16 --width=1

Variants, each in its own subprocess:
  jax                  the trainer's own jitted step (`steps.train_step_on_device_data`, compiled by
                       `parallel.Parallel.compile` with the state donated, exactly as `train_and_evaluate`
                       does) on on-device uint8 synthetic images (crop + flip drawn on device), and
                       `steps.evaluate_on_device_data` (one dispatch per window), with the settings
                       `cifar-jax` uses: on the CPU, oneDNN convolutions (cifar_jax/onednn_conv.py) on one
                       device, up to 8 steps per call (`program.steps_per_dispatch`). --jax_settings adds
                       variants: jax_xla, XLA's own convolutions with cpu_backend's settings (Eigen
                       convolutions, one virtual device per core, the batch sharded over them) and one
                       step per call: the default before oneDNN; jax_one_step, the default with one step
                       per call; jax_one_device, the default on one device; jax_sequential_scheduler, the
                       default under XLA:CPU's memory-minimising scheduler; jax_xla_batch_norm, the
                       default with XLA's BatchNorm instead of oneDNN's; jax_plain, XLA's own settings
                       and convolutions on one device, one step per call (before issue 7). The
                       regularisers' variants are the default with one switched on: jax_cutout
                       (data.cutout, 16 px), jax_cutmix (data.cutmix, alpha 1), jax_label_smoothing
                       (loss.label_smoothing 0.1), jax_ema (config.ema, updated inside every step);
                       `step_cost_over_plain` gives each one's time per step over the default's
                       (--jax_settings=default,cutout,cutmix,label_smoothing,ema).
  torch                `torch_reference.create_torch_model` (same model, width, init) with
                       `create_torch_optimizer` (SGD, coupled weight decay), eager, NCHW.
  torch_channels_last  the same, model and inputs in torch.channels_last.
  torch_compile        the same, model wrapped in torch.compile (opt in: --torch_modes=...,compile);
                       torch_compile_channels_last, compiled and channels_last (compile_channels_last).
On a GPU every torch variant sets torch.backends.cudnn.benchmark (cuDNN picks its fastest convolutions).
The torch step also reads uint8 NHWC images already on the device and does crop + flip + normalize there.
--dtype=bfloat16 is the JAX model's compute dtype (params and BatchNorm statistics stay float32: mixed
precision, docs/architecture.md) and torch.autocast(bfloat16) for torch. --dtype=float32,bfloat16 runs every
variant in both, as separate workers taking turns in the same windows (keys `jax_float32`,
`torch_channels_last_bfloat16`, ...; `bfloat16_over_float32_train` gives each variant's ratio). Everything
runs on the first device (JAX) / 'cuda' if available (torch).

Like `benchmark.py devices`, every worker first compiles and warms up, then they take turns window by
window (--windows of --steps train steps, then of --steps eval batches), so a noisy or shared machine slows
every variant alike; the median window is reported. The turn order rotates by one variant per window
(use at least as many windows as variants): whichever variant runs first after the others measured up to
20 % slower. Every window starts with --window_warmup untimed steps (and eval passes): on the development
VM a worker's first step after its pause is slow for every variant (the kernel's DAMON pageout reclaims
the idle worker's pages; the JAX step at width 0.25 took 0.41-0.45 s after a 2 s pause, 0.23-0.30 s
otherwise), so what is timed is the steady state a training run is in.

  compile_seconds  jax: lower + compile of the run's Program (train step, eval, epoch permutation).
                   torch: wall time of the first train step plus the first eval pass (for torch_compile
                   that is where dynamo/inductor compile; for eager it is only first-call overhead).
  peak_memory_mb   on GPU: jax memory_stats()['peak_bytes_in_use'], torch.cuda.max_memory_allocated();
                   on CPU: the worker's peak resident set (resource.getrusage ru_maxrss). The torch
                   workers also import JAX (torch_reference imports the flax model), which counts
                   towards their CPU figure. `peak_memory_source` says which one was used;
                   `host_peak_rss_mb` is always the RSS.

--end_to_end=E runs `cifar-jax` itself (python -m cifar_jax.main) for E epochs of --end_to_end_steps
steps on synthetic data after the windows, then times the bare step again; it reports the median
per-epoch images/s the trainer logs after its first epoch (the training loop: on-device shuffling,
crop, flip and the host loop included) against the bare step's median, and separately the rate with
each epoch's eval and checkpoint included."""

import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from bench import harness

TORCH_MODES = ('eager', 'channels_last', 'compile', 'compile_channels_last')
# The regularisers' variants (and the weights' moving average's): the default with these config fields
# changed (cifar_jax/augmentations.py, cifar_jax/ema.py).
REGULARIZERS = {'cutout': {'data.cutout.enabled': True},
                'cutmix': {'data.cutmix.enabled': True},
                'label_smoothing': {'loss.label_smoothing': 0.1},
                'ema': {'ema.enabled': True}}
JAX_SETTINGS = ('default', 'xla', 'one_step', 'one_device', 'plain', 'sequential_scheduler', 'xla_batch_norm',
                *REGULARIZERS)
STEPS_PER_EPOCH = 16  # the synthetic training set holds this many batches
DTYPES = ('float32', 'bfloat16')


def add_flags(parser) -> None:
  parser.add_argument('--model', default='resnet18', help='resnet18 | resnet9')
  parser.add_argument('--width', type=float, default=0.25, help='model.width_multiplier')
  parser.add_argument('--batch', type=int, default=128, help='train batch')
  parser.add_argument('--eval_batch', type=int, default=0, help='eval batch (0: --batch)')
  parser.add_argument('--dtype', default='float32',
                      help='float32 | bfloat16 | float32,bfloat16 (every variant in each, in the same '
                           'windows)')
  parser.add_argument('--steps', type=int, default=5, help='train steps (and eval batches) per window')
  parser.add_argument('--windows', type=int, default=3, help='timed windows per variant')
  parser.add_argument('--torch_modes', default='eager,channels_last',
                      help='comma-separated subset of ' + ','.join(TORCH_MODES) + '; empty: JAX only')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count(),
                      help='torch.set_num_threads (default os.cpu_count(); on a loaded machine fewer '
                           'threads avoid OpenMP oversubscription)')
  parser.add_argument('--no_jax', action='store_true', help='torch variants only')
  parser.add_argument('--jax_settings', default='default',
                      help='comma-separated subset of ' + ','.join(JAX_SETTINGS) + ': default is what '
                           'cifar-jax runs; see the module docstring for the others')
  parser.add_argument('--window_warmup', type=int, default=1,
                      help='untimed train steps (and eval passes) at the start of every window, for every '
                           'variant: after its pause the first step runs slow (see the module docstring)')
  parser.add_argument('--end_to_end', type=int, default=0,
                      help='> 0: also run cifar-jax itself for this many epochs on synthetic data and '
                           "compare its per-epoch images/s with the bare step's")
  parser.add_argument('--end_to_end_steps', type=int, default=40, help='steps per end-to-end epoch')
  parser.add_argument('--json', default='', help='write the results here')


def _variant_key(name: str) -> str:
  """'jax', 'jax_xla', 'torch', 'torch_channels_last', ...; with '@dtype' (several --dtype), '_dtype'
  added."""
  name, _, dtype = name.partition('@')
  if name.startswith('jax'):
    key = 'jax' if name == 'jax:default' else name.replace(':', '_')
  else:
    key = 'torch' if name == 'eager' else f'torch_{name}'
  return f'{key}_{dtype}' if dtype else key


def _config(args):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.name, config.model.width_multiplier = args.model, args.width
  config.model.dtype = args.dtype
  config.batch_size = args.batch
  config.eval_batch_size = args.eval_batch
  return config


def regularized(config, setting: str):
  """`config` with the fields of the regulariser `setting` (REGULARIZERS) changed."""
  for name, value in REGULARIZERS[setting].items():
    parent, _, leaf = name.rpartition('.')
    node = config
    for key in parent.split('.'):
      node = node[key]
    node[leaf] = value
  return config


def step_cost_over_plain(results: dict) -> dict:
  """Each regulariser variant's time per train step over the default's (the inverse ratio of their median
  train images per second); only the variants that ran."""
  plain = results.get('jax')
  return {name: plain['train_images_per_second'] / results[f'jax_{name}']['train_images_per_second']
          for name in REGULARIZERS if plain and results.get(f'jax_{name}')}


def _serve(ready, train_window, eval_window, memory) -> None:
  """Answers 'train' / 'eval' lines on stdin with one timed window each; 'done' reports memory."""
  harness.serve(ready, {'train': lambda: {'seconds': train_window()},
                        'eval': lambda: {'seconds': eval_window()}}, done=memory)


def synthetic_step(config, par, batch: int, num_eval: int):
  """The trainer's own compiled train and eval calls over `par` (`program.Program`), on synthetic data.

  The data (STEPS_PER_EPOCH batches of uint8 images, and `num_eval` eval images) sits on the devices;
  shuffling, crop and flip run inside the step. Returns (run, state, acc, program): `state, acc =
  run(state, acc, n)` runs n steps in calls of up to `program.max_steps_per_call` steps, as the trainer
  does; `program.evaluate(state)` is the trainer's eval and `program.compile_seconds` its compile time.
  """
  from cifar_jax import builders  # pylint: disable=g-import-not-at-top
  from cifar_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from cifar_jax import program  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.batch_size, config.data.augment = batch, True
  data = input_pipeline.make_synthetic(STEPS_PER_EPOCH * batch, num_eval)
  dataset = input_pipeline.Dataset(data['x_train'], data['y_train'], data['x_test'], data['y_test'],
                                   'test')
  model = builders.create_model(config.model, par.num_devices, par.mode, axis_name=par.axis_name)
  state, acc = par.place_per_seed(builders.create_initial_state(
      config, model, builders.create_run_schedules(config, STEPS_PER_EPOCH)))
  compiled = program.Program.compile(config, model, par, dataset, state, acc,
                                     *builders.seed_data_keys(config))
  perm = compiled.epoch_permutation(0)
  done = {'steps': 0}

  def run(state, acc, num_steps: int):
    end = done['steps'] + num_steps
    while done['steps'] < end:  # no host action: calls end at the epoch's end (or at `end`)
      state, acc, k = compiled.train_call(state, acc, perm, done['steps'], lambda step: step >= end)
      done['steps'] += k
    return state, acc

  return run, state, acc, compiled


def _jax_worker(args, setting: str) -> None:
  """The trainer's step under `setting`: 'default' is what `cifar-jax` does (cpu_backend.configure)."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # share a GPU with the torch workers
  config = _config(args)
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  if setting == 'default':
    cpu_backend.configure(config)
  elif setting == 'xla':  # the default before oneDNN: XLA's convolutions, cpu_backend's settings
    config.model.conv, config.steps_per_dispatch = 'xla', 1
    cpu_backend.configure(config)
  elif setting == 'one_step':  # the default, one step per call
    config.steps_per_dispatch = 1
    cpu_backend.configure(config)
  elif setting == 'one_device':
    config.cpu_devices = 1
    cpu_backend.configure(config)
  elif setting == 'sequential_scheduler':  # the default under XLA:CPU's memory-minimising scheduler
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {cpu_backend.SEQUENTIAL_SCHEDULER}".strip()
    cpu_backend.configure(config)
  elif setting == 'xla_batch_norm':  # the default with XLA's BatchNorm (before oneDNN's)
    config.model.batch_norm = 'xla'
    cpu_backend.configure(config)
  elif setting == 'plain':  # XLA's own settings and convolutions, one step per call (before issue 7)
    config.model.conv, config.steps_per_dispatch = 'xla', 1
  elif setting in REGULARIZERS:  # the default with one regulariser on
    regularized(config, setting)
    cpu_backend.configure(config)
  else:
    raise ValueError(f'unknown JAX setting {setting!r}; choose from {list(JAX_SETTINGS)}')
  import jax  # pylint: disable=g-import-not-at-top

  from cifar_jax import parallel  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  par = parallel.create(config.parallelism)  # every device, as train_and_evaluate
  run, state, acc, compiled = synthetic_step(config, par, args.batch, args.steps * args.eval_batch)
  compile_seconds = compiled.compile_seconds
  p_eval = compiled.evaluate

  holder = {'state': state, 'acc': acc}
  holder['state'], holder['acc'] = run(holder['state'], holder['acc'], 2)  # warm up
  jax.block_until_ready(p_eval(holder['state']))

  def train_steps(n):
    holder['state'], holder['acc'] = run(holder['state'], holder['acc'], n)
    jax.block_until_ready((holder['state'], holder['acc']))

  def train_window():
    train_steps(args.window_warmup)
    start = time.perf_counter()
    train_steps(args.steps)
    return time.perf_counter() - start

  def eval_window():
    for _ in range(args.window_warmup):
      jax.block_until_ready(p_eval(holder['state']))
    start = time.perf_counter()
    jax.block_until_ready(p_eval(holder['state']))
    return time.perf_counter() - start

  def memory():
    stats = None
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      pass
    out = {'host_peak_rss_mb': harness.peak_rss_mb()}
    if device.platform != 'cpu' and stats and 'peak_bytes_in_use' in stats:
      out.update(peak_memory_mb=stats['peak_bytes_in_use'] / 2**20,
                 peak_memory_source='jax memory_stats peak_bytes_in_use')
    else:
      out.update(peak_memory_mb=out['host_peak_rss_mb'], peak_memory_source='ru_maxrss')
    return out

  _serve({'compile_seconds': compile_seconds, 'devices': [str(d) for d in jax.devices()],
          'version': jax.__version__, 'backend': jax.default_backend()}, train_window, eval_window, memory)


def _torch_worker(args, mode: str) -> None:
  os.environ['JAX_PLATFORMS'] = 'cpu'  # torch_reference imports JAX; keep it off the GPU
  config = _config(args)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from cifar_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  device = torch.device(torch_reference.default_device())
  cuda = device.type == 'cuda'
  torch.backends.cudnn.benchmark = cuda
  memory_format = torch.channels_last if mode.endswith('channels_last') else torch.contiguous_format
  model = torch_reference.create_torch_model(config.model).to(device, memory_format=memory_format)
  optimizer = torch_reference.create_torch_optimizer(model.parameters(), config.optimizer)
  net = torch.compile(model) if mode.startswith('compile') else model
  autocast = (functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
              if args.dtype == 'bfloat16' else contextlib.nullcontext)

  n = STEPS_PER_EPOCH * args.batch
  data = input_pipeline.make_synthetic(n, args.steps * args.eval_batch)
  images = torch.from_numpy(data['x_train']).to(device)
  labels = torch.from_numpy(data['y_train'].astype(np.int64)).to(device)
  perm = torch.from_numpy(np.random.default_rng(0).permutation(n)).to(device)
  eval_images = torch.from_numpy(data['x_test']).to(device).split(args.eval_batch)
  eval_labels = torch.from_numpy(data['y_test'].astype(np.int64)).to(device).split(args.eval_batch)
  mean = torch.tensor(input_pipeline.MEAN_RGB, dtype=torch.float32, device=device).view(1, 3, 1, 1)
  std = torch.tensor(input_pipeline.STD_RGB, dtype=torch.float32, device=device).view(1, 3, 1, 1)
  gen = torch.Generator(device=device).manual_seed(0)
  size, pad = input_pipeline.IMAGE_SIZE, input_pipeline.PAD
  ar = torch.arange(size, device=device)

  def normalize(x):  # uint8 NHWC -> float32 NCHW (or channels_last), as torch_reference._torch_normalize
    x = ((x.permute(0, 3, 1, 2).float() / 255.0) - mean) / std
    return x.contiguous(memory_format=memory_format)

  def crop_flip(x):  # torch_reference.torch_crop_flip, drawn on the device
    b = x.shape[0]
    padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen, device=device)
    flip = torch.rand(b, generator=gen, device=device) < 0.5
    rows = offsets[:, :1] + ar
    cols = torch.where(flip[:, None], offsets[:, 1:] + size - 1 - ar, offsets[:, 1:] + ar)
    return padded[torch.arange(b, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]

  sums = {'loss': torch.zeros((), dtype=torch.float64, device=device),
          'correct': torch.zeros((), dtype=torch.int64, device=device)}
  counter = {'step': 0}

  def sync():
    if cuda:
      torch.cuda.synchronize()

  def train_step():
    i = counter['step'] % STEPS_PER_EPOCH
    counter['step'] += 1
    idx = perm[i * args.batch:(i + 1) * args.batch]
    x, y = normalize(crop_flip(images[idx])), labels[idx]
    model.train()
    with autocast():
      logits = net(x)
      loss = torch.nn.functional.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sums['loss'] += loss.detach().double() * y.shape[0]
    sums['correct'] += (logits.detach().argmax(1) == y).sum()

  def eval_pass():
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad(), autocast():
      for x, y in zip(eval_images, eval_labels):
        logits = net(normalize(x))
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), y, reduction='sum')
        correct += (logits.argmax(1) == y).sum()
    return loss_sum, correct

  start = time.perf_counter()
  train_step()
  sync()
  eval_pass()
  sync()
  compile_seconds = time.perf_counter() - start
  for _ in range(2):  # warm up
    train_step()
  eval_pass()
  sync()
  if cuda:
    torch.cuda.reset_peak_memory_stats()  # keep the steady-state peak (compile peaks are not the model's)

  def train_window():
    for _ in range(args.window_warmup):
      train_step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
      train_step()
    sync()
    return time.perf_counter() - start

  def eval_window():
    for _ in range(args.window_warmup):
      eval_pass()[0].item()
    start = time.perf_counter()
    loss_sum, _ = eval_pass()
    loss_sum.item()
    return time.perf_counter() - start

  def memory():
    out = {'host_peak_rss_mb': harness.peak_rss_mb()}
    if cuda:
      out.update(peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20,
                 peak_memory_source='torch.cuda.max_memory_allocated')
    else:
      out.update(peak_memory_mb=out['host_peak_rss_mb'], peak_memory_source='ru_maxrss')
    return out

  devices = [torch.cuda.get_device_name(0)] if cuda else [f'cpu ({torch.get_num_threads()} threads)']
  _serve({'compile_seconds': compile_seconds, 'devices': devices, 'version': torch.__version__,
          'backend': device.type}, train_window, eval_window, memory)


def _end_to_end(args) -> dict:
  """`cifar-jax` itself on synthetic data: the per-epoch images/s it logs (data pipeline included)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  n = args.end_to_end_steps * args.batch
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, '-m', 'cifar_jax.main', f'--config={harness.ROOT}/configs/default.py',
           f'--workdir={workdir}', f'--config.model.name={args.model}',
           f'--config.model.width_multiplier={args.width}', f'--config.model.dtype={args.dtype}',
           f'--config.batch_size={args.batch}', f'--config.eval_batch_size={args.eval_batch}',
           f'--config.num_epochs={args.end_to_end}', '--config.data.source=synthetic',
           f'--config.data.synthetic_train_size={n}', f'--config.data.synthetic_eval_size={args.eval_batch}',
           '--config.schedule.name=constant', '--config.progress_bar=False']
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=harness.ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
      sys.exit(f'end to end: cifar-jax failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
  epochs = [r['images_per_second'] for r in records]
  walls = [n / (b['elapsed_seconds'] - a['elapsed_seconds']) for a, b in zip(records, records[1:])]
  return {'command': ' '.join(cmd[1:]), 'epochs': args.end_to_end, 'steps_per_epoch': args.end_to_end_steps,
          'epoch_images_per_second': epochs,
          # the first epoch pays for warm-up; the rest are steady state
          'train_images_per_second': statistics.median(epochs[1:] or epochs),
          # epoch to epoch, eval and the checkpoint included
          'wall_images_per_second': statistics.median(walls) if walls else None,
          'process_seconds': wall, 'compile_seconds': records[0].get('compile_seconds')}


def worker(args) -> None:
  args.eval_batch = args.eval_batch or args.batch
  variant, _, dtype = args.worker.partition('@')
  args.dtype = dtype or args.dtype
  if variant.startswith('jax:'):
    _jax_worker(args, variant.split(':', 1)[1])
  else:
    _torch_worker(args, variant)


def _variants(args) -> tuple[list[str], list[str], list[str], list[str]]:
  """(variants, dtypes, torch modes, JAX settings) the flags ask for."""
  dtypes = args.dtype.split(',')
  if not dtypes or any(d not in DTYPES for d in dtypes) or len(set(dtypes)) < len(dtypes):
    raise harness.UsageError(f'--dtype: one or both of {list(DTYPES)}, comma-separated; got {args.dtype!r}')
  torch_modes = [m for m in args.torch_modes.split(',') if m]
  bad = [m for m in torch_modes if m not in TORCH_MODES]
  if bad:
    raise harness.UsageError(f'--torch_modes: unknown {bad}; choose from {list(TORCH_MODES)}')
  jax_settings = [] if args.no_jax else [x for x in args.jax_settings.split(',') if x]
  bad = [x for x in jax_settings if x not in JAX_SETTINGS]
  if bad:
    raise harness.UsageError(f'--jax_settings: unknown {bad}; choose from {list(JAX_SETTINGS)}')
  variants = [f'jax:{x}' for x in jax_settings] + torch_modes
  if len(dtypes) > 1:
    variants = [f'{v}@{d}' for v in variants for d in dtypes]
  if not variants:
    raise harness.UsageError('nothing to run')
  return variants, dtypes, torch_modes, jax_settings


def main(args) -> None:
  args.eval_batch = args.eval_batch or args.batch
  variants, dtypes, torch_modes, jax_settings = _variants(args)
  common = [f'--model={args.model}', f'--width={args.width}', f'--batch={args.batch}',
            f'--eval_batch={args.eval_batch}', f'--dtype={args.dtype}', f'--steps={args.steps}',
            f'--torch_threads={args.torch_threads}', f'--window_warmup={args.window_warmup}']

  def on_ready(w):
    print(f'{_variant_key(w.name)}: ready on {w.ready["devices"]}, compile '
          f'{w.ready["compile_seconds"]:.1f} s', flush=True)

  def on_window(index, rates):
    print(f'window {index + 1}: ' + ', '.join(
        f'{_variant_key(v)} train {rates[v]["train"][-1]:.0f} eval {rates[v]["eval"][-1]:.0f}'
        for v in variants), flush=True)

  commands = {v: harness.worker_command('step', v, common) for v in variants}
  with harness.workers(commands, on_ready=on_ready) as procs:
    ready = {v: w.ready for v, w in procs.items()}
    per_window = {'train': args.batch, 'eval': args.eval_batch}
    rates = harness.alternate(
        variants, args.windows,
        lambda v, kind: args.steps * per_window[kind] / procs[v].ask(kind)['seconds'],
        kinds=('train', 'eval'), on_window=on_window)
    end_to_end = None
    if args.end_to_end and 'jax:default' in variants:  # one --dtype only
      end_to_end = _end_to_end(args)
      epochs = ', '.join(f'{x:.0f}' for x in end_to_end['epoch_images_per_second'])
      print(f'end to end: cifar-jax epochs at {epochs} img/s', flush=True)
      for _ in range(args.windows):  # the bare step again, right after, on the same machine state
        seconds = procs['jax:default'].ask('train')['seconds']
        rates['jax:default']['train'].append(args.steps * args.batch / seconds)
      again = rates['jax:default']['train'][-args.windows:]
      print('bare step again: ' + ', '.join(f'{x:.0f}' for x in again), flush=True)
    memory = {v: procs[v].finish() for v in variants}

  results = {_variant_key(v): None for v in ['jax:default'] + list(TORCH_MODES)}
  for v in variants:
    results[_variant_key(v)] = {
        'train_images_per_second': statistics.median(rates[v]['train']),
        'eval_images_per_second': statistics.median(rates[v]['eval']),
        'compile_seconds': ready[v]['compile_seconds'],
        'peak_memory_mb': memory[v]['peak_memory_mb'],
        'peak_memory_source': memory[v]['peak_memory_source'],
        'host_peak_rss_mb': memory[v]['host_peak_rss_mb'],
        'train_windows': rates[v]['train'],
        'eval_windows': rates[v]['eval'],
        'devices': ready[v]['devices'],
    }
  jax_r, eager_r = results['jax'], results['torch']
  results['jax_over_torch_eager_train'] = (
      jax_r['train_images_per_second'] / eager_r['train_images_per_second'] if jax_r and eager_r else None)
  results['jax_over_torch_eager_eval'] = (
      jax_r['eval_images_per_second'] / eager_r['eval_images_per_second'] if jax_r and eager_r else None)
  if len(dtypes) > 1:
    results['bfloat16_over_float32_train'] = {
        _variant_key(v.partition('@')[0]): (results[_variant_key(v)]['train_images_per_second'] /
                                             results[_variant_key(f"{v.partition('@')[0]}@float32")][
                                                 'train_images_per_second'])
        for v in variants if v.endswith('@bfloat16') and f"{v.partition('@')[0]}@float32" in variants}
  results['step_cost_over_plain'] = step_cost_over_plain(results) or None
  if end_to_end:
    end_to_end['over_bare_step'] = (end_to_end['train_images_per_second'] /
                                    results['jax']['train_images_per_second'])
  results['end_to_end'] = end_to_end
  results['machine'] = {
      'platform': platform.platform(), 'processor': platform.processor(), 'cpu_count': os.cpu_count(),
      'python': platform.python_version(), 'jax': harness.version('jax'),
      'jaxlib': harness.version('jaxlib'), 'flax': harness.version('flax'),
      'torch': harness.version('torch'),
      'devices': {_variant_key(v): ready[v]['devices'] for v in variants},
      'backends': {_variant_key(v): ready[v]['backend'] for v in variants},
  }
  results['config'] = {'model': args.model, 'width': args.width, 'batch': args.batch,
                       'eval_batch': args.eval_batch, 'dtype': args.dtype, 'steps': args.steps,
                       'windows': args.windows, 'torch_modes': torch_modes,
                       'torch_threads': args.torch_threads, 'jax_settings': jax_settings,
                       'steps_per_epoch': STEPS_PER_EPOCH}

  print(f'\n{args.model} width {args.width}, batch {args.batch} (eval {args.eval_batch}), {args.dtype}, '
        f'{args.steps} steps x {args.windows} windows; medians:\n')
  rows = [[_variant_key(v)] + [results[_variant_key(v)][k] for k in
                                ('train_images_per_second', 'eval_images_per_second', 'compile_seconds',
                                 'peak_memory_mb')] for v in variants]
  print(harness.markdown_table(['variant', 'train img/s', 'eval img/s', 'compile s', 'peak MB'], rows))
  for key, ratio in results.get('bfloat16_over_float32_train', {}).items():
    print(f'  {key}: bfloat16 / float32 train {ratio:.2f}x')
  for name, ratio in (results['step_cost_over_plain'] or {}).items():
    print(f'  {name}: {ratio:.3f}x the plain step\'s time')
  if results['jax_over_torch_eager_train'] is not None:
    print(f'  jax / torch eager: train {results["jax_over_torch_eager_train"]:.2f}x, '
          f'eval {results["jax_over_torch_eager_eval"]:.2f}x')
  if end_to_end:
    print(f'  cifar-jax end to end (median epoch after the first): '
          f'{end_to_end["train_images_per_second"]:.1f} img/s, {end_to_end["over_bare_step"]:.2f}x the bare '
          f'step; with eval and checkpoints {end_to_end["wall_images_per_second"] or float("nan"):.1f} img/s')
  harness.write_json(args.json, results)
