"""The Shake-Shake and ShakeDrop gates in PyTorch (the twin of `models.shake`): `Gate`, a
`torch.autograd.Function` that multiplies by one factor forward and another backward.

Each gate module draws its factors with torch's generator in training mode, or takes them as inputs: set
`module.gates = {'forward': f, 'backward': b}` (tensors broadcasting over NCHW, e.g. the (N, 1, 1, 1)
arrays the Flax model sows, transposed) and the next forward pass uses them. So fed the same gates,
the two frameworks compute the same logits and gradients.
"""

import numpy as np
import torch
from torch import nn


class Gate(torch.autograd.Function):
  """`x * forward` whose gradient with respect to x is `grad * backward`."""

  @staticmethod
  def forward(ctx, x, forward, backward):  # pylint: disable=arguments-differ
    ctx.save_for_backward(backward)
    return x * forward

  @staticmethod
  def backward(ctx, grad):  # pylint: disable=arguments-differ
    (backward,) = ctx.saved_tensors
    return grad * backward, None, None


def as_torch_gate(value) -> torch.Tensor:
  """A gate factor sown by the Flax model ((N, 1, 1, 1) NHWC or ()) as a tensor for NCHW."""
  return torch.from_numpy(np.array(value, np.float32))


def _uniform(n: int, level: str, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
  shape = (n, 1, 1, 1) if level == 'image' else ()
  return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(low, high)


class ShakeShake(nn.Module):
  """`a * b1 + (1 - a) * b2` forward, `beta` in place of a backward (see `models.shake.ShakeShake`)."""

  def __init__(self, forward='shake', backward='shake', level='image'):
    super().__init__()
    self.forward_mode, self.backward_mode, self.level = forward, backward, level
    self.gates = None

  def forward(self, b1, b2):
    if not self.training:
      return 0.5 * b1 + 0.5 * b2
    if self.gates is not None:
      a, beta = self.gates['forward'], self.gates['backward']
      self.gates = None
    else:
      half = torch.tensor(0.5, dtype=b1.dtype, device=b1.device)
      a = _uniform(b1.shape[0], self.level, 0.0, 1.0, b1) if self.forward_mode == 'shake' else half
      if self.backward_mode == 'shake':
        beta = _uniform(b1.shape[0], self.level, 0.0, 1.0, b1)
      else:
        beta = a if self.backward_mode == 'keep' else half
    return Gate.apply(b1, a, beta) + Gate.apply(b2, 1.0 - a, 1.0 - beta)


class ShakeDrop(nn.Module):
  """F scaled by `b + a - b*a` forward, `b + c - b*c` backward (see `models.shake.ShakeDrop`)."""

  def __init__(self, p: float, level='image', alpha_range=(-1.0, 1.0), beta_range=(0.0, 1.0)):
    super().__init__()
    self.p, self.level, self.alpha_range, self.beta_range = p, level, alpha_range, beta_range
    self.gates = None

  def extra_repr(self) -> str:
    return f'p={self.p:.4f}, level={self.level}'

  def forward(self, x):
    if not self.training:
      expected_alpha = 0.5 * (self.alpha_range[0] + self.alpha_range[1])
      return x * (self.p + expected_alpha - self.p * expected_alpha)
    if self.gates is not None:
      forward, backward = self.gates['forward'], self.gates['backward']
      self.gates = None
    else:
      n = x.shape[0]
      b = (_uniform(n, self.level, 0.0, 1.0, x) < self.p).to(x.dtype)
      a = _uniform(n, 'image', *self.alpha_range, like=x)
      c = _uniform(n, 'image', *self.beta_range, like=x)
      forward, backward = b + a - b * a, b + c - b * c
    return Gate.apply(x, forward, backward)

