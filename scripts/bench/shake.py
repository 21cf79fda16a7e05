"""The cost of the Shake-Shake and ShakeDrop gates: each gated model's train step against the same network
without them, alternating timed windows in one process (medians), on the trainer's step and convolutions.

  python scripts/benchmark.py shake --pairs=resnet18:0.25,shake_shake:32 --batch=128 --windows=5
  python scripts/benchmark.py shake --pairs=shake_shake:96,resnet18:1 --json=out.json  # the GPU check's

Pairs: `resnet18:W` (or resnet9) is the blog's ResNet at width W without / with ShakeDrop (p_L = 0.5, gates
per image); `shake_shake:N` is Shake-Shake-26 2xNd mixing its branches 0.5 / 0.5 without draws
(forward and backward 'even', one factor per batch) / with Shake-Shake-Image; `pyramidnet:D:A` is
PyramidNet-D (alpha A; bottleneck when D = 9n + 2, else basic) without / with ShakeDrop.
"""

import time

from bench import harness


def add_flags(parser) -> None:
  parser.add_argument('--pairs', default='resnet18:0.25,shake_shake:32')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3, help='train steps per timed window')
  parser.add_argument('--windows', type=int, default=5, help='timed windows per model, alternating')
  parser.add_argument('--json', default='', help='write the results here')


def model_configs(pair: str):
  """(label, plain model config, gated model config) of a --pairs entry."""
  from configs import default  # pylint: disable=g-import-not-at-top

  name, *values = pair.split(':')
  plain = default.get_config().model
  plain.name = name
  if name in ('resnet18', 'resnet9'):
    plain.width_multiplier = float(values[0])
    gated = plain.copy_and_resolve_references()
    gated.shakedrop.p_last = 0.5
    return f'{name} width {values[0]}', plain, gated
  if name == 'shake_shake':
    plain.depth, plain.base_width = 26, int(values[0])
    plain.shake.update(forward='even', backward='even', level='batch')
    gated = plain.copy_and_resolve_references()
    gated.shake.update(forward='shake', backward='shake', level='image')
    return f'shake_shake 26 2x{values[0]}d', plain, gated
  if name == 'pyramidnet':
    plain.depth, plain.pyramid_alpha = int(values[0]), float(values[1])
    plain.block = 'bottleneck' if (plain.depth - 2) % 9 == 0 and (plain.depth - 2) % 6 else 'basic'
    plain.shakedrop.p_last = 1.0
    gated = plain.copy_and_resolve_references()
    gated.shakedrop.p_last = 0.5
    return f'pyramidnet {values[0]} alpha {values[1]} {plain.block}', plain, gated
  raise harness.UsageError(f'--pairs: unknown model {name!r} (resnet18:W, resnet9:W, shake_shake:N, '
                           'pyramidnet:D:A)')


def step_timer(model_config, batch: int, steps_per_window: int):
  """A function timing `steps_per_window` jitted train steps (the trainer's `steps.train_step`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cifar_jax import builders  # pylint: disable=g-import-not-at-top
  from cifar_jax import steps  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  model = builders.create_model(model_config)
  config = default.get_config()
  config.model = model_config
  state = builders.create_train_state(jax.random.key(0), config, model, lambda count: 0.01)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  data_key = builders.run_keys(0)[1]

  @jax.jit
  def step(state):
    return steps.train_step(state, (images, labels), rngs=steps.shake_rngs(data_key, 0, state.step))[0]

  start = time.perf_counter()
  state = jax.block_until_ready(step(state))
  compile_seconds = time.perf_counter() - start
  holder = {'state': state}

  def window() -> float:
    start = time.perf_counter()
    s = holder['state']
    for _ in range(steps_per_window):
      s = step(s)
    holder['state'] = jax.block_until_ready(s)
    return (time.perf_counter() - start) / steps_per_window

  return window, compile_seconds, builders.conv_impl(model_config)


def _call_first(timers: dict):
  """measure(kind): one window of that kind's timer."""
  return lambda kind: timers[kind][0]()


def main(args) -> None:
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  pairs = [(pair, *model_configs(pair)) for pair in args.pairs.split(',')]  # usage errors before JAX starts
  config = default.get_config()
  config.cpu_devices = 1
  cpu_backend.configure(config)  # the trainer's XLA:CPU settings (before JAX starts)
  import jax  # pylint: disable=g-import-not-at-top

  results = {'machine': {'devices': str(jax.devices()), 'backend': jax.default_backend()},
             'batch': args.batch, 'pairs': []}
  for pair, label, plain, gated in pairs:
    timers = {kind: step_timer(model_config, args.batch, args.steps)
              for kind, model_config in (('plain', plain), ('gated', gated))}
    seconds = harness.alternate(['plain', 'gated'], args.windows, _call_first(timers), rotate=False)
    medians = {kind: harness.median(v) for kind, v in seconds.items()}
    row = {'pair': pair, 'label': label, 'conv': timers['plain'][2],
           'plain_step_s': medians['plain'], 'gated_step_s': medians['gated'],
           'gated_over_plain': medians['gated'] / medians['plain'],
           'gated_images_per_second': args.batch / medians['gated'],
           'plain_windows_s': seconds['plain'], 'gated_windows_s': seconds['gated'],
           'compile_s': {kind: timers[kind][1] for kind in timers}}
    results['pairs'].append(row)
    print(f'{label}, batch {args.batch} ({row["conv"]} convolutions): plain {medians["plain"] * 1e3:.1f} ms, '
          f'gated {medians["gated"] * 1e3:.1f} ms a step ({row["gated_over_plain"]:.3f}x; '
          f'{row["gated_images_per_second"]:.0f} images/s), medians of {args.windows} windows of '
          f'{args.steps} steps', flush=True)
  print('\n' + harness.markdown_table(
      ['model', 'convolutions', 'plain ms/step', 'gated ms/step', 'gated / plain', 'gated images/s'],
      [[r['label'], r['conv'], r['plain_step_s'] * 1e3, r['gated_step_s'] * 1e3,
        f"{r['gated_over_plain']:.3f}x", f"{r['gated_images_per_second']:.0f}"] for r in results['pairs']]))
  harness.write_json(args.json, results)
