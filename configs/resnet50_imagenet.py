"""ResNet-50 on ImageNet-1k, the standard 90-epoch recipe (Goyal et al. 2017, "Accurate, Large
Minibatch SGD", section 5; the torchvision/timm baseline): SGD with Nesterov momentum 0.9,
lr 0.1 x batch/256 with 5 warmup epochs then cosine, weight decay 1e-4 off biases and BN, label
smoothing 0.1, Inception crop + flip at 224, eval at 224 from a resize to 256 (crop_pct 0.875).

Needs ImageNet prepared for tfds (imagenet2012: download the files by hand as the tfds catalogue
says, then `tfds.builder('imagenet2012').download_and_prepare()`).

    python train.py --config=configs/resnet50_imagenet.py --workdir=runs/resnet50_imagenet \
        --config.data.data_dir=~/tensorflow_datasets --keep_freed_memory
    python train.py --config=configs/resnet50_imagenet.py:runlocal --workdir=/tmp/smoke
"""

from configs import common


def get_config(arg: str | None = None):
    local = arg == "runlocal"
    size = 32 if local else 224
    c = common.base()
    c.model.name = "resnet50"
    c.data.name = "imagenet2012"
    c.data.batch_size = 1024
    c.data.eval_batch_size = 1000
    c.data.train_ops = f"random_resized_crop(size={size})|flip"
    c.data.eval_ops = f"resize_center_crop(size={size}, crop_pct=0.875)"
    c.data.num_workers = 8
    c.num_epochs = 90.0
    c.method.label_smoothing = 0.1
    c.optim.name = "sgd"
    c.optim.lr = 0.1
    c.optim.lr_base_batch = 256
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 5.0
    c.evals.every_steps = 5000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    return common.runlocal(c, "resnet20") if local else c
