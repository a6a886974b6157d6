"""ResNet-50 on ImageNet-1k, timm's "ResNet strikes back" procedure A3 (Wightman, Touvron and
Jégou 2021, table 1; 78.1% top-1 at 224 in the paper): 100 epochs at batch 2048, LAMB lr 8e-3
with 5 warmup epochs then cosine, weight decay 0.02, binary cross-entropy (targets binarised at
0.2) with mixup 0.1 / cutmix 1.0, RandAugment m6 mstd0.5, Inception crop + flip at 160 px, and
testing at 224 with crop_pct 0.95 (the train/test resolution discrepancy, Touvron et al. 2019:
a ResNet trained at a lower resolution is best tested higher). No label smoothing, stochastic
depth, repeated augmentation or EMA in A3.

    python train.py --config=configs/resnet50_a3_imagenet.py --workdir=runs/resnet50_a3 \
        --config.data.data_dir=~/tensorflow_datasets --keep_freed_memory
    python train.py --config=configs/resnet50_a3_imagenet.py:runlocal --workdir=/tmp/smoke
"""

from configs import common


def get_config(arg: str | None = None):
    local = arg == "runlocal"
    train_size, test_size = (24, 32) if local else (160, 224)
    c = common.base()
    c.model.name = "resnet50"
    c.data.name = "imagenet2012"
    c.data.batch_size = 2048
    c.data.eval_batch_size = 1000
    c.data.train_ops = (
        f"random_resized_crop(size={train_size})|flip|rand_augment(magnitude=6, magnitude_std=0.5)"
    )
    c.data.eval_ops = f"resize_center_crop(size={test_size}, crop_pct=0.95)"
    c.data.num_workers = 8
    c.data.mixup_alpha = 0.1
    c.data.cutmix_alpha = 1.0
    c.num_epochs = 100.0
    c.method.multiclass_loss = "sigmoid"
    c.method.bce_target_threshold = 0.2
    c.optim.name = "lamb"
    c.optim.lr = 8e-3
    c.optim.lr_base_batch = 2048
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-6
    c.optim.weight_decay = 0.02
    c.optim.grad_clip_norm = 1.0  # timm's Lamb clips the global gradient norm at 1 itself
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 5.0
    c.evals.every_steps = 5000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    return common.runlocal(c, "resnet20") if local else c
