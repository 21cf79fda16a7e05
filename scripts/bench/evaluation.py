"""The evaluation's cost: the compiled eval at each test-time augmentation level (evaluation.tta: 1, 2 and
6 views), and the host's OOD scoring and temperature fit (evaluation.ood, evaluation.temperature).

  JAX_PLATFORMS=cpu python scripts/benchmark.py evaluation --model=resnet18 --width=0.25 \
      --num_images=2000 --batch=500 --windows=3 --json=/tmp/bench_evaluation.json

TTA: one model's eval (`steps.evaluate_variables`, jit, the eval set pre-split on the device as `Program`
holds it) over --num_images random images, each level compiled once; a window times one pass per level,
the levels' order rotating each window (harness.alternate); images/s are the eval set's images (not the
views). OOD: `ood.scores` and `ood.metrics` of every score for --num_images in-distribution against
--ood_images OOD predictions over --classes classes (drawn from a Dirichlet), and `temperature.fit` on the
in-distribution ones, timed per window. Everything runs in this process, on the XLA:CPU settings cifar-jax
uses.
"""

import functools
import time

import numpy as np

from bench import harness


def add_flags(parser) -> None:
  parser.add_argument('--model', default='resnet18')
  parser.add_argument('--width', type=float, default=0.25, help='model.width_multiplier')
  parser.add_argument('--num_images', type=int, default=2000, help='the eval set (in-distribution) size')
  parser.add_argument('--batch', type=int, default=500, help='eval_batch_size')
  parser.add_argument('--levels', default='none,flip,flip_translate', help='evaluation.tta levels to time')
  parser.add_argument('--ood_images', type=int, default=10000, help="the OOD set's size for the scoring")
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--windows', type=int, default=3)
  parser.add_argument('--json', default='', help='write the results here')


def main(args) -> None:
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  from cifar_jax import tta  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  levels = args.levels.split(',')
  unknown = [level for level in levels if level not in tta.LEVELS]
  if unknown:
    raise harness.UsageError(f'--levels: unknown {unknown}; choose among {list(tta.LEVELS)}')
  config = default.get_config()
  config.model.name, config.model.width_multiplier = args.model, args.width
  config.eval_batch_size = args.batch
  cpu_backend.configure(config)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cifar_jax import builders  # pylint: disable=g-import-not-at-top
  from cifar_jax import ood  # pylint: disable=g-import-not-at-top
  from cifar_jax import steps  # pylint: disable=g-import-not-at-top
  from cifar_jax import temperature  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  model = builders.create_model(config.model)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                                  jnp.zeros((1, 32, 32, 3), jnp.float32))
  images = rng.integers(0, 256, (args.num_images, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, args.num_images).astype(np.int32)
  arrays = jax.device_put(steps.batched_eval_arrays(images, labels, args.batch))
  compiled, compile_seconds = {}, {}
  for level in levels:
    start = time.perf_counter()
    compiled[level] = jax.jit(functools.partial(
        steps.evaluate_variables, model.apply, tta=level)).lower(
            variables['params'], variables.get('batch_stats', {}), *arrays).compile()
    compile_seconds[level] = time.perf_counter() - start

  def eval_pass(level: str) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled[level](variables['params'], variables.get('batch_stats', {}), *arrays))
    return args.num_images / (time.perf_counter() - start)

  for level in levels:  # a first call of each outside the windows
    eval_pass(level)
  tta_runs = harness.alternate(levels, args.windows, eval_pass)

  def draw(n):
    return np.log(rng.dirichlet(np.full(args.classes, 0.3), n)).astype(np.float32)

  in_log_probs, ood_log_probs = draw(args.num_images), draw(args.ood_images)

  def host(task: str) -> float:
    start = time.perf_counter()
    if task == 'ood':
      in_scores = ood.scores(in_log_probs, ood.entropy(in_log_probs))
      ood_scores = ood.scores(ood_log_probs, ood.entropy(ood_log_probs))
      for score in in_scores:
        ood.metrics(in_scores[score], ood_scores[score])
    else:
      temperature.fit(in_log_probs, labels)
    return time.perf_counter() - start

  host_runs = harness.alternate(['ood', 'temperature'], args.windows, host)
  base = harness.median(tta_runs[levels[0]])
  tta_rows = [[level, tta.num_views(level), f'{harness.median(tta_runs[level]):.0f} '
               f'({min(tta_runs[level]):.0f}-{max(tta_runs[level]):.0f})',
               f'{base / harness.median(tta_runs[level]):.2f}x', compile_seconds[level]] for level in levels]
  host_rows = [['OOD scoring: 3 scores, AUROC / AUPRC / FPR@95 each',
                f'{args.num_images} in + {args.ood_images} OOD', harness.median(host_runs['ood'])],
               ['temperature fit (golden-section, 80 steps)', f'{args.num_images}',
                harness.median(host_runs['temperature'])]]
  lines = [f'{args.model} width {args.width}, {args.num_images} eval images in batches of {args.batch}, '
           f'median of {args.windows} alternating window(s); {harness.describe(harness.fingerprint())}.', '',
           harness.markdown_table(['evaluation.tta', 'views', 'eval images/s (median; range)',
                                   f'eval time vs {levels[0]}', 'compile (s)'], tta_rows), '',
           harness.markdown_table(['host work', 'predictions', 'seconds (median)'], host_rows, digits=3)]
  print('\n'.join(lines))
  harness.write_json(args.json, {
      'args': harness.flag_values(args),
      'tta': {level: {'views': tta.num_views(level), 'images_per_second': harness.median(tta_runs[level]),
                      'windows': tta_runs[level], 'compile_seconds': compile_seconds[level]}
              for level in levels},
      'ood_scoring_seconds': harness.median(host_runs['ood']),
      'temperature_fit_seconds': harness.median(host_runs['temperature'])})
