"""DINO (Caron et al. 2021) on CIFAR-10 with a ViT-S at patch size 4 (8 x 8 tokens at 32 px),
the paper's ViT recipe scaled to 32-pixel images: 2 global crops 0.4-1 at 32 px and 6 local
crops 0.05-0.4 at 16 px, colour jitter s = 0.5 (p = 0.8), grayscale 0.2, no blur at this size,
solarize 0.2 on the second global crop; head 2048 -> 2048 -> 256 -> K = 65536 (weight-
normalised last layer, frozen for the first epoch); student temperature 0.1, teacher 0.04 ->
0.07 over 30 epochs, centre momentum 0.9, teacher momentum 0.996 -> 1; AdamW at lr 5e-4 x
batch/256 with 10 warmup epochs then cosine, weight decay 0.04 -> 0.4 (cosine), gradient
clipping at 3.0, drop path 0.1; 800 epochs at batch 256. For a GPU and tfds CIFAR-10.

Expected: no published figure for this exact setting. solo-learn's DINO on a CIFAR-stem
ResNet-18 (2 views, 1000 epochs) reports 89.52% top-1 (online linear), lightly's 84.0% k-NN
(k = 200, 200 epochs).

    python train.py --config=configs/dino_vit_small_cifar10.py --workdir=runs/dino_cifar10
"""

from configs import common


def get_config():
    c = common.base()
    c.model.name = "vit_small_patch16_224"
    c.model.patch_size = 4
    c.model.img_size = 32
    c.model.drop_path_rate = 0.1
    c.data.name = "cifar10"
    c.data.batch_size = 256
    c.data.eval_batch_size = 1000
    c.data.num_workers = 8
    c.num_epochs = 800.0
    c.method.name = "dino"
    c.method.crop_size = 32
    c.method.crop_min_scale = 0.4
    c.method.num_local_crops = 6
    c.method.local_crop_size = 16
    c.method.local_crop_min_scale = 0.05
    c.method.color_jitter = 0.5
    c.method.blur = False
    c.method.proj_hidden_dim = 2048
    c.method.proj_dim = 256
    c.method.out_dim = 65536
    c.method.temperature = 0.1
    c.method.teacher_temp_start = 0.04
    c.method.teacher_temp = 0.07
    c.method.teacher_temp_warmup_epochs = 30.0
    c.method.center_momentum = 0.9
    c.method.ema_momentum = 0.996
    c.method.freeze_last_layer_epochs = 1.0
    c.optim.name = "adamw"
    c.optim.lr = 5e-4
    c.optim.lr_base_batch = 256
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.grad_clip_norm = 3.0
    c.schedule.warmup_epochs = 10.0
    c.evals.names = "knn,linear_probe"
    c.evals.every_steps = 19_500  # 100 epochs
    c.checkpoint.every_steps = 1950
    c.logging.every_steps = 100
    return c
