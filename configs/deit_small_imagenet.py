"""DeiT-S on ImageNet-1k, the DeiT recipe (Touvron et al. 2021, table 9; 79.8% top-1): 300
epochs at batch 1024, AdamW lr 5e-4 x batch/512 with 5 warmup epochs then cosine, weight decay
0.05, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment m9 mstd0.5, random erasing 0.25,
stochastic depth 0.1, repeated augmentation 3x, Inception crop + flip at 224, eval at 224 from a
resize to 256 (crop_pct 0.875).

    python train.py --config=configs/deit_small_imagenet.py --workdir=runs/deit_small \
        --config.data.data_dir=~/tensorflow_datasets --keep_freed_memory
    python train.py --config=configs/deit_small_imagenet.py:runlocal --workdir=/tmp/smoke
"""

from configs import common


def get_config(arg: str | None = None):
    local = arg == "runlocal"
    size = 32 if local else 224
    c = common.base()
    c.model.name = "deit_small_patch16_224"
    c.model.drop_path_rate = 0.1
    c.data.name = "imagenet2012"
    c.data.batch_size = 1024
    c.data.eval_batch_size = 1000
    common.deit_augmentation(c, size)
    c.data.num_workers = 8
    c.data.repeated_augmentations = 3
    c.num_epochs = 300.0
    c.optim.name = "adamw"
    c.optim.lr = 5e-4
    c.optim.lr_base_batch = 512
    c.optim.weight_decay = 0.05
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 5.0
    c.schedule.end_lr_factor = 1e-5 / 5e-4  # DeiT's min lr 1e-5
    c.evals.every_steps = 5000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    return common.runlocal(c, "vit_nano_patch4_32") if local else c
