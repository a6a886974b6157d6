"""EfficientNet-B0 on ImageNet-1k, the TF recipe (Tan and Le 2019, section 5.2, and
tensorflow/tpu models/official/efficientnet; 77.1% top-1): RMSProp with TF's semantics (decay
0.9, momentum 0.9, epsilon 1e-3 inside the square root, the learning rate inside the momentum),
lr 0.016 x batch/256 with 5 warmup epochs then exponential decay 0.97 every 2.4 epochs, 350
epochs, L2 weight decay 1e-5, BatchNorm momentum 0.99 and epsilon 1e-3, dropout 0.2 before the
classifier, drop-connect (stochastic depth) 0.2, label smoothing 0.1, model EMA 0.9999,
RandAugment (2 ops, magnitude 9; the paper used AutoAugment), Inception crop + flip at 224,
eval at 224 from a resize to 256 (bicubic).

    python train.py --config=configs/efficientnet_b0_imagenet.py --workdir=runs/effnet_b0 \
        --config.data.data_dir=~/tensorflow_datasets --keep_freed_memory
    python train.py --config=configs/efficientnet_b0_imagenet.py:runlocal --workdir=/tmp/smoke
"""

from configs import common


def get_config(arg: str | None = None):
    local = arg == "runlocal"
    size = 32 if local else 224
    c = common.base()
    c.model.name = "efficientnet_b0"
    c.model.drop_path_rate = 0.2
    c.model.drop_rate = 0.2
    c.model.bn_momentum = 0.99
    c.model.bn_epsilon = 1e-3
    c.data.name = "imagenet2012"
    c.data.batch_size = 2048
    c.data.eval_batch_size = 1000
    c.data.train_ops = (
        f"random_resized_crop(size={size}, interpolation='bicubic')|flip|rand_augment(magnitude=9)"
    )
    c.data.eval_ops = f"resize_center_crop(size={size}, crop_pct=0.875, interpolation='bicubic')"
    c.data.num_workers = 8
    c.num_epochs = 350.0
    c.method.label_smoothing = 0.1
    c.optim.name = "rmsprop_tf"
    c.optim.lr = 0.016
    c.optim.lr_base_batch = 256
    c.optim.rms_decay = 0.9
    c.optim.momentum = 0.9
    c.optim.eps = 1e-3
    c.optim.weight_decay = 1e-5
    c.optim.ema_decay = 0.9999
    c.schedule.name = "exponential"
    c.schedule.warmup_epochs = 5.0
    c.schedule.decay_rate = 0.97
    c.schedule.decay_epochs = 2.4
    c.evals.every_steps = 5000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    return common.runlocal(c, "efficientnet_b0_stem1_32") if local else c
