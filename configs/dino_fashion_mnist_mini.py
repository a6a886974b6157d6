"""DINO (Caron et al. 2021) pretraining of a ResNet-8 on the embedded Fashion-MNIST subset,
on a CPU in minutes; k-NN and linear-probe accuracy (of the teacher) on the embedded test
split at each eval.

Multi-crop: 2 global crops of 28 px (scale 0.4-1) and 4 local crops of 12 px (0.05-0.4), no
blur at this size; head 256 -> 256 -> 64 -> K = 1024 with BatchNorm (a ResNet backbone, as
the paper's ResNet runs); student temperature 0.1, teacher 0.04 throughout (facebookresearch/
dino's default: warming it up to 0.07 over 5 epochs left the teacher near uniform, entropy
5.99 of ln K = 6.93 nats, and k-NN 74.55% against 75.40%), centre momentum 0.9, teacher
momentum 0.99 -> 1 (short run), last layer frozen for the first epoch; LARS at lr 0.3 x
batch/256 (solo-learn's CIFAR recipe), weight decay 1e-6.
README.md (Self-supervised) has the measured accuracy and time.

    python train.py --config=configs/dino_fashion_mnist_mini.py --workdir=runs/dino
"""

from configs import simclr_fashion_mnist_mini


def get_config():
    c = simclr_fashion_mnist_mini.get_config()
    c.num_epochs = 20.0
    c.method.name = "dino"
    c.method.crop_min_scale = 0.4
    c.method.num_local_crops = 4
    c.method.local_crop_size = 12
    c.method.proj_hidden_dim = 256
    c.method.proj_dim = 64
    c.method.out_dim = 1024
    c.method.head_batch_norm = True
    c.method.temperature = 0.1
    c.method.teacher_temp_start = 0.04
    c.method.teacher_temp = 0.04
    c.method.teacher_temp_warmup_epochs = 0.0
    c.method.ema_momentum = 0.99
    c.method.freeze_last_layer_epochs = 1.0
    c.optim.lr = 0.3
    c.optim.weight_decay = 1e-6
    return c
