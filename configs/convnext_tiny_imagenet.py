"""ConvNeXt-T on ImageNet-1k, the paper's 300-epoch recipe (Liu et al. 2022, table 5 in
appendix A; 82.1% top-1): batch 4096, AdamW lr 4e-3 x batch/4096 with 20 warmup epochs then
cosine, weight decay 0.05, stochastic depth 0.1, layer scale initialised at 1e-6 (the model's
default), label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment m9 mstd0.5, random erasing
0.25, model EMA 0.9999, Inception crop + flip at 224 (bicubic), eval at 224 from a resize to
256. The EMA model is evaluated beside the raw one (`ema_accuracy`).

    python train.py --config=configs/convnext_tiny_imagenet.py --workdir=runs/convnext_tiny \
        --config.data.data_dir=~/tensorflow_datasets --keep_freed_memory
    python train.py --config=configs/convnext_tiny_imagenet.py:runlocal --workdir=/tmp/smoke
"""

from configs import common


def get_config(arg: str | None = None):
    local = arg == "runlocal"
    size = 32 if local else 224
    c = common.base()
    c.model.name = "convnext_tiny"
    c.model.drop_path_rate = 0.1
    c.data.name = "imagenet2012"
    c.data.batch_size = 4096
    c.data.eval_batch_size = 1000
    common.deit_augmentation(c, size)
    c.data.num_workers = 8
    c.num_epochs = 300.0
    c.optim.name = "adamw"
    c.optim.lr = 4e-3
    c.optim.lr_base_batch = 4096
    c.optim.weight_decay = 0.05
    c.optim.ema_decay = 0.9999
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 20.0
    c.evals.every_steps = 5000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    return common.runlocal(c, "convnext_atto_stem2_32") if local else c
