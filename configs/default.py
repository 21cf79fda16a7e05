"""The blog's Part-1 baseline: ResNet18, BatchNorm, batch 128, SGD lr 0.05, MultiStepLR([25, 40], 0.1),
50 epochs.

Every field the trainer reads is defined here; experiment files import this one and change what differs.
Blog figure: 93.42 % test accuracy after 50 epochs (Part 1, fixed baseline, zero_init_residual=True).

  cifar-jax --config=configs/default.py --workdir=runs/default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # > 1: train seeds seed, seed + 1, .., seed + num_seeds - 1 together, one vmap-ed step for all (README,
  # "Many seeds in one run"); seed i is the run `seed + i` would be. Metrics gain _mean, _std, _per_seed.
  # parallelism=jit only (see seed_devices); pmap and multi-process runs refuse num_seeds > 1.
  config.num_seeds = 1
  config.num_epochs = 50
  config.batch_size = 128
  config.eval_batch_size = 1000

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet18'  # resnet18 | resnet9 | shake_shake | pyramidnet
  config.model.norm = 'batch'  # batch | group_ws
  config.model.width_multiplier = 1.0  # stage widths 64/128/256/512 times this
  config.model.zero_init_residual = True
  # float32 | bfloat16: the compute dtype (mixed precision: convolutions, matmuls and activations in
  # bfloat16; params, optimizer state, BatchNorm statistics, loss, SWA/SWAG and metrics stay float32;
  # docs/architecture.md). On a CPU with avx512_bf16 or amx_bf16 the convolutions are oneDNN's bfloat16
  # ones (README, Speed); on other CPUs and on GPUs, XLA's bfloat16 convolutions.
  config.model.dtype = 'float32'
  # auto | xla | onednn: convolutions through oneDNN on a one-device CPU run (auto), or XLA's own
  config.model.conv = 'auto'
  # auto | xla | onednn: training-mode BatchNorm through oneDNN's batch normalisation primitives wherever
  # the convolutions are oneDNN's (auto; not the pretrained families in float32), or XLA's own ops (xla:
  # the bits of runs before 2026-12-07). docs/performance.md.
  config.model.batch_norm = 'auto'
  # shake_shake (Shake-Shake-depth 2x{base_width}d) and pyramidnet (PyramidNet-depth, alpha): README,
  # "Shake-Shake and ShakeDrop". depth: shake_shake 6n + 2; pyramidnet 6n + 2 (basic) or 9n + 2 (bottleneck)
  config.model.depth = 26
  config.model.base_width = 32  # shake_shake: N, the first stage's width (stages N, 2N, 4N)
  config.model.pyramid_alpha = 270.0  # pyramidnet: the width added over the 3n blocks
  config.model.block = 'basic'  # pyramidnet: basic | bottleneck
  # shake_shake's gates: forward shake (a ~ U(0, 1)) | even (0.5); backward shake (an independent draw) |
  # even | keep (the forward draw); level image (a draw per image) | batch (one per batch)
  config.model.shake = ml_collections.ConfigDict()
  config.model.shake.forward = 'shake'
  config.model.shake.backward = 'shake'
  config.model.shake.level = 'image'
  # ShakeDrop on each residual branch (pyramidnet; resnet18 / resnet9 when p_last < 1): keep probability
  # p_l = 1 - (l / L)(1 - p_last) for block l of L; 1.0 = no ShakeDrop (the blog's ResNets). level: b drawn
  # per image (Google's flax_models) or once per batch (owruby/shake-drop_pytorch); a, c always per image
  config.model.shakedrop = ml_collections.ConfigDict()
  config.model.shakedrop.p_last = 1.0
  config.model.shakedrop.level = 'image'
  # The families that start from ImageNet weights (torchvision_resnet18 / 34 / 50, efficientnet_lite0;
  # README, "Fine-tuning pretrained weights"): the batch is resized on the device to image_size (0 = 32 px);
  # resize_size > image_size: training resizes to it and crops image_size at random (BiT: 160, 128), eval
  # resizes to image_size. normalization: the weights' (auto: imagenet mean / std for the ResNets,
  # inception [-1, 1] for EfficientNet-Lite) | imagenet | inception
  config.model.image_size = 0
  config.model.resize_size = 0
  config.model.normalization = 'auto'
  # True: every BatchNorm normalises with its running statistics and keeps them, in training too
  config.model.frozen_bn = False
  config.model.dropout_rate = 0.2  # efficientnet_lite0: before fc (the package's default)
  config.model.drop_connect_rate = 0.2  # efficientnet_lite0: block i of 16 drops its branch at rate * i / 16

  config.data = ml_collections.ConfigDict()
  # tfds | npz | cifar10_python | cifar100_python | images (scripts/gpu/gpu_bundle.py) | synthetic. The class
  # count comes from the data (docs/cifar100.md): TFDS's ClassLabel, cifar-100-python's meta (100 fine
  # labels), an npz's num_classes array (absent: 10), synthetic_num_classes; the model's head follows it
  config.data.source = 'tfds'
  config.data.tfds_name = 'cifar10'  # tfds: cifar10 | cifar100
  config.data.data_dir = ''  # tfds: where the dataset is prepared ('' = TFDS's default)
  # npz: the file; cifar10_python / cifar100_python: the cifar-10-batches-py / cifar-100-python folder;
  # images: the folder
  config.data.path = ''
  config.data.validation_size = 0  # > 0: hold out this many from the end of train, evaluate on them
  config.data.drop_remainder = False  # False: a final partial batch, like torch's drop_last=False
  config.data.augment = True  # random crop (pad 4) and horizontal flip
  # The input's mean / std (input_pipeline.NORMALIZATIONS): cifar10 (the blog's constants) | cifar100 (the
  # standard CIFAR-100 ones, its training pixels' mean and std); the CIFAR families only (a pretrained
  # family normalises as its weights expect, model.normalization)
  config.data.normalization = 'cifar10'
  # > 0: BiT's mixup, each training batch mixed with itself permuted at a weight ~ Beta(mixup, mixup)
  # (steps.mixup; BiT's HyperRule: 0.1 for 20k examples or more)
  config.data.mixup = 0.0
  # Cutout (DeVries & Taylor 2017; cifar_jax/augmentations.py): `count` squares of side `size` px per
  # training image, each centred anywhere (clipped at the edges), zeroed after crop, flip and normalisation
  # (CIFAR-10: one of 16 px; airbench96: 12). Training batches only (not the SWA BatchNorm pass).
  config.data.cutout = ml_collections.ConfigDict()
  config.data.cutout.enabled = False
  config.data.cutout.size = 16
  config.data.cutout.count = 1
  # CutMix (Yun et al. 2019; timm's mixup.py): lam ~ Beta(alpha, alpha), one box per batch of area about
  # (1 - lam) pasted from each image's partner (a random permutation), lam corrected to the clipped box's
  # area, the loss mixed by it. prob: the chance a batch is mixed at all; with data.mixup > 0 too, a mixed
  # batch is CutMix's with chance switch_prob, else mixup's (timm's Mixup: prob, switch_prob).
  config.data.cutmix = ml_collections.ConfigDict()
  config.data.cutmix.enabled = False
  config.data.cutmix.alpha = 1.0
  config.data.cutmix.prob = 1.0
  config.data.cutmix.switch_prob = 0.5
  config.data.synthetic_train_size = 2048
  config.data.synthetic_eval_size = 512
  config.data.synthetic_seed = -1  # synthetic: the seed of the images; -1 = config.seed
  config.data.synthetic_num_classes = 10  # synthetic: the class count (100: a CIFAR-100-shaped run)
  # A folder of the released CIFAR-10-C (or CIFAR-100-C) files (<corruption>.npy, labels.npy; the
  # corruptions of the test set) for --mode=evaluate's evaluation.shift; '' = generate them from the
  # evaluation images (cifar_jax/corruptions.py).
  config.data.corruptions_path = ''

  # The training loss (evaluation's NLL is always the plain cross-entropy). label_smoothing: eps in [0, 1),
  # torch's CrossEntropyLoss(label_smoothing=eps): the target (1 - eps) one-hot + eps / K (timm: 0.1;
  # airbench: 0.2); 0 = off.
  config.loss = ml_collections.ConfigDict()
  config.loss.label_smoothing = 0.0

  # torch.optim.SGD with coupled weight decay (added to every parameter's gradient before momentum).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 5e-4
  config.optimizer.clip_grad_norm = 0.0  # > 0: torch's clip_grad_norm_ of the trained parameters' gradients
  # Gradient accumulation: each batch (drawn whole: order, crops, mixup) runs forward and backward in this
  # many micro-batches of batch_size / micro_batches, one at a time (the memory of one micro-batch's
  # activations), their gradients weighted by size and added, then one update (clipping the sum): a
  # model without BatchNorm takes the whole batch's update; BatchNorm normalises each micro-batch by its
  # own statistics and folds them into the running ones in turn, as torch's accumulation loop does. A last
  # partial batch splits as torch.tensor_split does (as evenly as possible). 1 = off.
  config.optimizer.micro_batches = 1

  # Pretrained weights (cifar_jax/pretrained.py; README, "Fine-tuning pretrained weights"). path: a torch
  # state dict (.pt / .pth / .bin, read with weights_only=True), a .safetensors file, or for layout
  # cifar_jax an exported .npz or a workdir. layout: how its keys are spelled, torchvision_resnet |
  # timm_resnet | efficientnet_lite | cifar_jax. strict: every key must map (the head may differ in its class
  # count: it is then zeros). A run that resumes from its own checkpoint ignores init_from.
  config.init_from = ml_collections.ConfigDict()
  config.init_from.path = ''
  config.init_from.layout = ''
  config.init_from.strict = True
  # Fine-tuning by stage (a model's stages: README; e.g. stem, layer1..layer4, head): comma-separated
  # names. frozen: not trained ('backbone' = every stage but head: a linear probe; pair with
  # model.frozen_bn=True). lr_multipliers: 'layer1=0.1,layer2=0.3' scale optimizer.lr (the schedule) per
  # stage. no_weight_decay: stages trained without weight decay.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.frozen = ''
  config.finetune.lr_multipliers = ''
  config.finetune.no_weight_decay = ''

  # torch.optim.lr_scheduler semantics, torch's argument names; see cifar_jax/schedules.py.
  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'multistep'
  config.schedule.step_every = ''  # epoch | batch; '' = what the blog did for this schedule
  config.schedule.milestones = (25, 40)  # multistep, in scheduler steps (epochs when stepped per epoch)
  config.schedule.gamma = 0.1  # multistep, step (cyclic: exp_range's gamma)
  config.schedule.step_size = 30  # step
  config.schedule.T_max = -1  # cosine; -1 = the run's length in scheduler steps
  config.schedule.eta_min = 0.0  # cosine, warm_restarts
  config.schedule.T_0 = 20  # warm_restarts
  config.schedule.T_mult = 1  # warm_restarts
  config.schedule.fractional = False  # warm_restarts: torch's documented step(epoch + i / iters) loop
  config.schedule.max_lr = 0.1  # one_cycle, cyclic (optimizer.lr is cyclic's base_lr)
  config.schedule.total_steps = -1  # one_cycle; -1 = num_epochs * steps_per_epoch
  config.schedule.pct_start = 0.3  # one_cycle
  config.schedule.anneal_strategy = 'cos'  # one_cycle
  config.schedule.div_factor = 25.0  # one_cycle
  config.schedule.final_div_factor = 1e4  # one_cycle
  config.schedule.three_phase = False  # one_cycle
  config.schedule.step_size_up = 2000  # cyclic, in batches
  config.schedule.step_size_up_epochs = 0  # cyclic: > 0 sets step_size_up (and down) in epochs
  config.schedule.step_size_down = -1  # cyclic; -1 = step_size_up
  config.schedule.mode = 'triangular'  # cyclic: triangular | triangular2 | exp_range
  config.schedule.cycle_momentum = True  # cyclic, one_cycle: cycle momentum inversely to the lr
  config.schedule.base_momentum = 0.85  # one_cycle (cyclic's torch default is 0.8)
  config.schedule.max_momentum = 0.95  # one_cycle (cyclic's torch default is 0.9)
  config.schedule.warmup_epochs = 0  # linear warm-up (LinearLR then the schedule, via SequentialLR)
  config.schedule.warmup_start_factor = 1.0 / 3.0
  # warmup_cosine (big_vision): lr * step / warmup_steps, then cosine to 0 at the run's end, per batch.
  # bit_hyperrule (BiT): warm-up and steps / 10 at the support points of dataset_size (< 20k: 100..500;
  # < 500k: 500, 3k, 6k, 9k, end 10k; else 500, 6k, 12k, 18k, end 20k), per batch
  config.schedule.warmup_steps = 500
  config.schedule.dataset_size = 50_000
  # plateau (ReduceLROnPlateau on eval_loss, stepped per epoch)
  config.schedule.factor = 0.1
  config.schedule.patience = 10
  config.schedule.threshold = 1e-4
  config.schedule.threshold_mode = 'rel'
  config.schedule.cooldown = 0
  config.schedule.min_lr = 0.0
  config.schedule.plateau_mode = 'min'

  # Stochastic Weight Averaging (torch.optim.swa_utils); see cifar_jax/swa.py.
  config.swa = ml_collections.ConfigDict()
  config.swa.enabled = False
  config.swa.start_epoch = 20  # epochs of the main schedule; epochs after it average the weights
  config.swa.lr = 0.01  # the lr of the SWA phase
  config.swa.schedule = 'constant'  # constant (the blog) | swa_lr (torch SWALR: anneal to swa.lr)
  config.swa.anneal_epochs = 10  # swa_lr
  config.swa.anneal_strategy = 'cos'  # swa_lr: cos | linear
  config.swa.update_every_steps = 0  # > 0: average every this many steps instead of every epoch
  config.swa.decay = 0.0  # > 0: exponential moving average with this decay instead of the equal mean
  config.swa.recalibration_augment = True  # update_bn over augmented training batches, as the blog
  config.swa.eval_every_epoch = False  # also recalibrate and evaluate the SWA model every SWA epoch

  # SWAG (Maddox et al. 2019; cifar_jax/swag.py): needs swa.enabled; collected whenever SWA averages,
  # evaluated at the end (swag_eval_*; num_seeds > 1: MultiSWAG, multiswag_eval_*) and by --mode=evaluate.
  config.swag = ml_collections.ConfigDict()
  config.swag.enabled = False
  config.swag.rank = 20  # K: the deviations kept (K floats per parameter per seed)
  config.swag.scale = 0.5  # s: samples theta = m + sqrt(s) * (...); 0 = the SWA model
  config.swag.num_samples = 30  # S: models averaged (each with its own BatchNorm pass)
  config.swag.diag_only = False  # the diagonal variance only (no deviations held)
  config.swag.var_clamp = 1e-30  # the diagonal variance's floor
  config.swag.bn_update_fraction = 1.0  # each sample's BatchNorm pass: this fraction of an epoch's batches
  config.swag.samples_per_call = 0  # samples recalibrated and evaluated in one vmap-ed call; 0 = auto (<= 4)
  # An exponential moving average of the weights (timm's ModelEmaV2 / V3; cifar_jax/ema.py), updated in the
  # compiled step after every every_steps-th optimizer step: ema = d * ema + (1 - d) * params, starting
  # from the initial weights. Evaluated each epoch (ema_eval_*), an EMA row in --mode=evaluate (and under
  # shift), exported with --export_model=ema. Coexists with SWA and SWAG.
  config.ema = ml_collections.ConfigDict()
  config.ema.enabled = False
  config.ema.decay = 0.999  # d, in [0, 1): 0.999 averages over about the last 1000 updates
  # True: d = min(decay, (1 + t) / (10 + t)) for update t = 0, 1, ... (TensorFlow's num_updates rule)
  config.ema.warmup = False
  config.ema.every_steps = 1  # update after every this many optimizer steps
  # BatchNorm statistics: average (timm ModelEmaV2 and V3's default: the same d) | copy (the running
  # model's at each update: ModelEmaV3's exclude_buffers=True)
  config.ema.batch_stats = 'average'
  # --mode=evaluate under distribution shift (CIFAR-10-C; README, "Evaluating under shift"): every model
  # of the evaluation table on each corruption and severity of the evaluation images (the test set, or
  # the held-out split), from data.corruptions_path's released files or generated here.
  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.shift = ''  # '' = the clean table only; 'all' (the 19); or names 'fog,snow,...'
  config.evaluation.severities = (1, 2, 3, 4, 5)
  config.evaluation.shift_seed = 0  # generated sets: image i draws from (this, corruption, severity, i)
  # generated sets are cached as uint8 .npz keyed by the source images' hash: 'auto' =
  # ~/.cache/cifar_jax/cifar10_c (or $XDG_CACHE_HOME/cifar_jax/cifar10_c), a folder, or '' (none)
  config.evaluation.shift_cache = 'auto'
  # Test-time augmentation (docs/uncertainty.md, cifar_jax/tta.py): airbench's views, their probabilities
  # averaged with its weights, in every evaluation (each epoch's, --mode=evaluate's rows, under shift):
  # 'none'; 'flip' (the image and its mirror); 'flip_translate' (those and one-pixel translations: 6 views).
  config.evaluation.tta = 'none'
  # --mode=evaluate: one temperature per row, fitted on the held-out split (data.validation_size > 0,
  # which is then the evaluation set) by minimising its NLL; the rows' NLL, ECE and Brier after it.
  config.evaluation.temperature = False
  # --mode=evaluate: out-of-distribution detection against these sets, separated by commas (the evaluation
  # set is the in-distribution one): 'SOURCE:PATH' (a data source's test split, e.g. 'npz:/data/svhn.npz',
  # 'cifar10_python:/data/cifar-10-batches-py'), 'tfds:NAME' (a prepared TFDS set's test split, e.g.
  # 'tfds:svhn_cropped'), 'noise' (uniform noise images), 'corrupted:NAME:SEVERITY' (the evaluation images
  # under a CIFAR-10-C corruption); AUROC, AUPRC, FPR at 95 % TPR per row and score.
  config.evaluation.ood = ''
  # The LR range test (`--mode=lr_find`, cifar_jax/lr_find.py): this config's training with the lr growing
  # exponentially from start_lr to end_lr over num_steps steps (fastai's defaults: 1e-7, 10, 100); it
  # suggests schedule.max_lr for the one-cycle configs (README, "Picking max_lr").
  config.lr_find = ml_collections.ConfigDict()
  config.lr_find.start_lr = 1e-7
  config.lr_find.end_lr = 10.0
  config.lr_find.num_steps = 100
  # fastai: lr_i = start * (end / start)^(i / n), the loss a debiased moving average (beta 0.98);
  # torch_lr_finder: i / (n - 1), 0.05 * loss + 0.95 * the previous smoothed loss
  config.lr_find.smoothing = 'fastai'
  # stop once the smoothed loss exceeds this times the best; 0 = the anchor's (fastai 4, torch_lr_finder 5)
  config.lr_find.diverge_factor = 0.0
  # the suggestion printed as --config.schedule.max_lr (median over seeds): steep (fastai: the steepest
  # fall against log lr), valley (fastai's default), minimum, slide (fastai) or steepest (torch-lr-finder).
  # steep: one-cycle at its 0.06 matched the blog's 0.1 and valley's 0.0044 lost 14 points (RESULTS.md)
  config.lr_find.suggestion = 'steep'

  # Data parallelism over every visible device (README, "Multi-GPU and multi-host"); the global batch,
  # its order, augmentation and BatchNorm statistics are the same on any number of devices.
  config.parallelism = 'jit'  # jit (one program over a device mesh) | pmap (per-device program)
  # JAX on the CPU: split it into this many virtual devices, the batch sharded over them
  # (cifar_jax/cpu_backend.py); 0 = one per core (jit, one process, one seed, batch_size divides): on 2
  # cores 1.06x one device at width 0.25, within the noise at width 1 (BENCHMARKS.md).
  config.cpu_devices = 0
  # num_seeds > 1 (jit only): a 2-D mesh ('seeds', 'data'); this many devices along 'seeds' (each trains
  # num_seeds / seed_devices models, no communication), the rest split each batch. 0 = the largest
  # number that divides both num_seeds and the device count.
  config.seed_devices = 0
  # Multi-process runs (jax.distributed): unset fields ('', 0, -1) fall back to JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID, then to jax's Slurm / Open MPI detection; none set: one process.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ''  # host:port of process 0, e.g. 10.0.0.1:1234
  config.distributed.num_processes = 0
  config.distributed.process_id = -1

  config.checkpoint_every_steps = 0  # > 0: also checkpoint every this many steps (else every epoch)
  config.keep_checkpoints = 3
  # Write each checkpoint in the background while training goes on (orbax's async checkpointing; the next
  # save and the run's end wait for it, and only a committed checkpoint is resumed). False: wait for each.
  config.async_checkpoints = True
  # Train steps per call of the compiled step (a loop on the device); 0 = auto: 8 on a one-device CPU run,
  # where each call pays for fresh temporary buffers, else 1. Logs, checkpoints, SWA updates end a call.
  config.steps_per_dispatch = 0
  # JAX's persistent compilation cache (cifar_jax/compilation_cache.py): 'auto' = ~/.cache/cifar_jax/jax
  # (or $JAX_COMPILATION_CACHE_DIR), a folder, or '' for none. A second run of a config compiles nothing.
  config.compilation_cache = 'auto'
  config.log_every_steps = 50  # progress bar refresh (a host sync); metrics are per epoch
  config.progress_bar = True
  config.halt_on_nan = True
  return config
