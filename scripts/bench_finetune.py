"""Fine-tuning throughput, JAX vs torch: EfficientNet-Lite0 (or a torchvision ResNet) training steps on
CIFAR-size images resized on the device, full fine-tune or linear probe.

  JAX_PLATFORMS=cpu python scripts/bench_finetune.py --model=efficientnet_lite0 --image_size=64 --batch=50

Variants, one after the other in this process, each compiled / warmed up first, then --steps steps timed:
  jax            the trainer's jitted `steps.train_step` with `builders.create_optimizer` (the config's stage
                 groups), the model's convolutions as `cifar-jax` picks them (`builders.conv_impl`: oneDNN on
                 one CPU device; depthwise ones stay XLA's)
  torch          the torch twin (`torch_models.finetune`: the package's / torchvision-named model behind the
                 same input transform, the same param groups), eager, NCHW
  torch_cl       the same in torch.channels_last
Reports images/s of wall time and images per CPU-second of this process (the second is steadier on a
shared machine: other jobs' load slows the first).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cifar_jax import builders  # noqa: E402
from cifar_jax import steps  # noqa: E402
from cifar_jax.torch_models import finetune  # noqa: E402
from configs import default  # noqa: E402


def _config(args):
  config = default.get_config()
  config.model.name = args.model
  config.model.image_size = args.image_size
  config.optimizer.lr = 0.01
  if args.probe:
    config.finetune.frozen = 'backbone'
    config.model.frozen_bn = True
  return config


def _timed(step, n: int) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of n calls of step()."""
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(n):
    step()
  return time.perf_counter() - wall, time.process_time() - cpu


def bench_jax(args, images, labels):
  config = _config(args)
  model = builders.create_model(config.model)
  params, batch_stats = builders.initialized(jax.random.PRNGKey(0), model)
  state = steps.TrainState.create(apply_fn=model.apply, params=params, batch_stats=batch_stats,
                                  tx=builders.create_optimizer(config, config.optimizer.lr))
  step = jax.jit(steps.train_step, donate_argnums=0)
  batch = (jnp.asarray(images), jnp.asarray(labels))
  rngs = {'shake': jax.random.PRNGKey(1)}
  holder = [state]

  def one():
    holder[0], metrics = step(holder[0], batch, rngs=rngs)
    jax.block_until_ready(metrics)

  for _ in range(args.warmup):
    one()
  return _timed(one, args.steps), model.conv_impl


def bench_torch(args, images, labels, channels_last: bool):
  config = _config(args)
  torch.manual_seed(0)
  model = finetune.create_model(config.model, 10)
  optimizer = finetune.create_optimizer(model, config)
  finetune.set_train_mode(model, config.model.frozen_bn)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels).long()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

  def one():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  for _ in range(args.warmup):
    one()
  return _timed(one, args.steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='efficientnet_lite0')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch', type=int, default=50)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--probe', action='store_true', help='linear probe (frozen backbone and BatchNorm)')
  parser.add_argument('--variants', default='jax,torch,torch_cl')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  rng = np.random.RandomState(0)
  images = rng.randn(args.batch, 32, 32, 3).astype(np.float32)
  labels = rng.randint(0, 10, args.batch).astype(np.int32)
  rows = []
  for variant in args.variants.split(','):
    if variant == 'jax':
      (wall, cpu), conv = bench_jax(args, images, labels)
      variant = f'jax ({conv} convolutions)'
    else:
      wall, cpu = bench_torch(args, images, labels, channels_last=variant == 'torch_cl')
    n = args.steps * args.batch
    rows.append({'variant': variant, 'images_per_second': n / wall, 'images_per_cpu_second': n / cpu})
    print(f'{variant:32s} {n / wall:8.1f} images/s  {n / cpu:8.1f} images per CPU-second', flush=True)
  what = 'linear probe' if args.probe else 'full'
  print(f'{args.model} at {args.image_size} px, batch {args.batch}, {what}, torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), jax {jax.__version__}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
