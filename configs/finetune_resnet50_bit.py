"""BiT's HyperRule for a user's torchvision / timm ResNet-50 file (big_transfer `bit_hyperrule.py`,
`bit_pytorch/train.py`): the head replaced by zeros, SGD momentum 0.9, lr 0.003 at batch 512, 500 warm-up
steps, lr / 10 at 3k, 6k and 9k steps, stop at 10k (CIFAR-10's 50,000 examples); resized to 160 px and
cropped at random to 128, flipped (after the trainer's pad-4 crop at 32 px); no weight decay; ImageNet
mean / std, as torchvision's and timm's ResNets were trained; mixup 0.1 (HyperRule: 20k examples or more).
BiT-M-R50x1 reaches 97.2-97.4 % on CIFAR-10 this way (BiT's own GroupNorm + WS model, not a torchvision
file); not measured here.

  cifar-jax --config=configs/finetune_resnet50_bit.py --workdir=runs/bit_r50 \\
    --config.init_from.path=resnet50.pth  # torchvision's resnet50 state dict (timm's: layout=timm_resnet)
  # shorter: the HyperRule's steps follow schedule.dataset_size, so shorten both (under 20k examples:
  # 100 warm-up steps, lr / 10 at 200, 300 and 400, end at 500): 6 epochs of 98 steps cover it
  cifar-jax --config=configs/finetune_resnet50_bit.py --workdir=runs/bit_r50_short \\
    --config.init_from.path=resnet50.pth --config.num_epochs=6 --config.schedule.dataset_size=10000

A warm-up or decay beyond the run is said at start-up.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'torchvision_resnet50'
  config.model.image_size = 128
  config.model.resize_size = 160
  config.init_from.path = 'resnet50.pth'  # give yours with --config.init_from.path
  config.init_from.layout = 'torchvision_resnet'
  config.batch_size = 512
  config.eval_batch_size = 500
  config.num_epochs = 102  # 98 steps an epoch: 9,996 steps (BiT stops at 10k)
  config.optimizer.lr = 0.003
  config.optimizer.weight_decay = 0.0
  config.schedule.name = 'bit_hyperrule'
  config.schedule.dataset_size = 50_000
  config.data.mixup = 0.1  # bit_hyperrule.get_mixup: 0.1 from 20k examples on
  return config
