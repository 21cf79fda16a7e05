"""A fast modern recipe for ResNet18 on CIFAR-10: configs/one_cycle_30.py (one-cycle, max_lr 0.1, 30 epochs;
blog: 93.77 %) with the regularisers a timm or airbench user expects: label smoothing 0.1, one 16 px Cutout
square per image, and an exponential moving average of the weights.

Sources: label smoothing as torch's `CrossEntropyLoss(label_smoothing=...)`, at timm's default 0.1
(airbench94/96 use 0.2 for their much shorter runs); Cutout from DeVries & Taylor 2017
(`uoguelph-mlrg/Cutout`: one 16 px square for CIFAR-10, ResNet18 test error 5.17 -> 4.72 % over 200
epochs); the EMA from timm's `ModelEmaV2`/`ModelEmaV3` (`timm/utils/model_ema.py`: decay with a warm-up)
and airbench94/96's weight averaging; one-cycle from the blog (Part 2) and airbench's short schedules.
CutMix (Yun et al. 2019; timm's `mixup.py`) is left off: it pays off over long runs (kuangliu/pytorch-cifar
PR #144: ResNet18 93.02 -> 95.84 % over 200 epochs), not over 30 epochs; turn it on with
--config.data.cutmix.enabled=True.

This project has not measured the recipe at full width; RESULTS.md holds its CPU-scale runs (ResNet18 at
width 0.25, a few epochs) beside the one-cycle baseline with their commands.

  cifar-jax --config=configs/modern_recipe.py --workdir=runs/modern_recipe
"""

from configs import one_cycle_30


def get_config():
  config = one_cycle_30.get_config()
  config.loss.label_smoothing = 0.1
  config.data.cutout.enabled = True
  config.data.cutout.size = 16
  config.data.cutout.count = 1
  # The weights' EMA (config.ema), updated after every step and evaluated each epoch (ema_eval_*):
  config.ema.enabled = True
  config.ema.decay = 0.999  # a horizon of ~1000 steps: 2.6 of the 391-step epochs
  config.ema.warmup = True  # min(decay, (1 + t) / (10 + t)) for update t: 0.999 from t = 8990 on
  return config
