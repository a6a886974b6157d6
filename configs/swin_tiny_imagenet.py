"""Swin-T on ImageNet-1k, the paper's 300-epoch recipe (Liu et al. 2021, appendix A2.1 and
the official configs/swin_tiny_patch4_window7_224.yaml; 81.3% top-1): batch 1024, AdamW lr
5e-4 x batch/512 with 20 warmup epochs then cosine to 5e-6, weight decay 0.05, gradient
clipping at norm 5, stochastic depth 0.2, label smoothing 0.1, mixup 0.8 / cutmix 1.0,
RandAugment m9 mstd0.5, random erasing 0.25, Inception crop + flip at 224 (bicubic), eval at
224 from a resize to 256. The paper found repeated augmentation and EMA of no help: off.

    python train.py --config=configs/swin_tiny_imagenet.py --workdir=runs/swin_tiny \
        --config.data.data_dir=~/tensorflow_datasets --keep_freed_memory
    python train.py --config=configs/swin_tiny_imagenet.py:runlocal --workdir=/tmp/smoke
"""

from configs import common


def get_config(arg: str | None = None):
    local = arg == "runlocal"
    size = 32 if local else 224
    c = common.base()
    c.model.name = "swin_tiny_patch4_window7_224"
    c.model.drop_path_rate = 0.2
    c.data.name = "imagenet2012"
    c.data.batch_size = 1024
    c.data.eval_batch_size = 1000
    common.deit_augmentation(c, size)
    c.data.num_workers = 8
    c.num_epochs = 300.0
    c.optim.name = "adamw"
    c.optim.lr = 5e-4
    c.optim.lr_base_batch = 512
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 5.0
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 20.0
    c.schedule.end_lr_factor = 0.01  # min lr 5e-6 of 5e-4
    c.evals.every_steps = 5000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    return common.runlocal(c, "swin_nano_patch2_window4_32") if local else c
