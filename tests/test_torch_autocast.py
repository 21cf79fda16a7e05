"""The bfloat16 mixed-precision step against torch.autocast(bfloat16): same weights, same batch, one SGD step.

Both sides round the convolutions' and the linear layer's operands and results to bfloat16 (8 significant
bits, a relative step of 2^-8 = 0.4 %) and keep params, BatchNorm statistics and the loss in float32, but
round in different places (XLA or oneDNN vs torch's oneDNN, fused or not), so they agree to bfloat16's
precision, not float32's (test_torch_parity.py's 1e-5). The tolerances are in bfloat16 steps; measured over
three seeds (ResNet9 width 1/8, batch 16, oneDNN's bfloat16 convolutions on an AVX512-BF16 CPU): loss
0.01-0.02 steps, BatchNorm statistics 0.002-0.014, params 1.8-2.1, the largest at the zero-initialised
BatchNorm biases, which after one step are the gradient itself (lr times it), so they show the gradients'
bfloat16 error undiluted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

from cifar_jax import builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import smoke  # pylint: disable=g-import-not-at-top,wrong-import-position

BFLOAT16_STEP = 2.0**-8  # bfloat16's relative rounding step
LOSS_RTOL = 0.25 * BFLOAT16_STEP  # the step's loss: |jax - torch| / |torch|
PARAMS_RTOL = 4 * BFLOAT16_STEP  # each param after the step: max |jax - torch| / max |torch|
STATS_RTOL = 0.5 * BFLOAT16_STEP  # each running mean / variance: statistics of bfloat16 activations
BATCH = 16


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_bfloat16_step_matches_torch_autocast():
  config = smoke.get_config()
  config.model.name, config.model.width_multiplier, config.model.dtype = 'resnet9', 0.125, 'bfloat16'
  lr, momentum, wd = 0.05, 0.9, 5e-4
  torch.manual_seed(0)
  model = torch_reference.create_torch_model(config.model)
  variables = torch_reference.torch_to_flax(model.state_dict())
  rng = np.random.default_rng(4)
  x = rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, BATCH)

  # The trainer's model: bfloat16 compute, its convolutions (oneDNN's bfloat16 where the CPU has it).
  fmodel = models.create_model('resnet9', width_multiplier=0.125, dtype=jnp.bfloat16,
                               conv_impl=builders.conv_impl(config.model))
  tx = optax.chain(optax.add_decayed_weights(wd), optax.trace(momentum), optax.scale_by_learning_rate(lr))

  @jax.jit
  def step(params, batch_stats):
    def loss_fn(p):
      logits, updates = fmodel.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                     mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, changes), updates['batch_stats'], loss

  params, batch_stats, loss = step(variables['params'], variables['batch_stats'])

  optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
  model.train()
  with torch_reference.autocast('bfloat16', 'cpu'):
    logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    torch_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
  assert logits.dtype == torch.bfloat16 and torch_loss.dtype == torch.float32
  optimizer.zero_grad()
  torch_loss.backward()
  optimizer.step()
  want = torch_reference.torch_to_flax(model.state_dict())

  assert all(p.dtype == torch.float32 for p in model.parameters())
  assert {str(p.dtype) for p in jax.tree.leaves((params, batch_stats))} == {'float32'}
  assert rel_err(loss, torch_loss.item()) < LOSS_RTOL
  assert max(jax.tree.leaves(jax.tree.map(rel_err, params, want['params']))) < PARAMS_RTOL
  assert max(jax.tree.leaves(jax.tree.map(rel_err, batch_stats, want['batch_stats']))) < STATS_RTOL


def test_train_and_evaluate_torch_runs_bfloat16_under_autocast(tmp_path, monkeypatch):
  config = smoke.get_config()
  config.model.width_multiplier, config.model.dtype = 0.125, 'bfloat16'
  config.num_epochs = 1
  config.batch_size, config.eval_batch_size = 16, 32
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 40, 24
  seen = []
  create = torch_reference.create_torch_model

  def create_and_watch(model_config, **kwargs):  # records the dtype of every logits tensor, train and eval
    model = create(model_config, **kwargs)
    model.fc.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    return model

  monkeypatch.setattr(torch_reference, 'create_torch_model', create_and_watch)
  model, last = torch_reference.train_and_evaluate_torch(config, str(tmp_path), 'identical', 'cpu')
  assert seen and set(seen) == {torch.bfloat16}
  assert all(p.dtype == torch.float32 for p in model.parameters())
  assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
  assert np.isfinite(last['train_loss']) and np.isfinite(last['eval_loss'])
