"""BYOL (Grill et al. 2020) on CIFAR-10 with a CIFAR-stem ResNet-18, solo-learn's recipe
(scripts/pretrain/cifar/byol.yaml): 1000 epochs at batch 256, random-resized crops 0.08-1 at
32 px, colour jitter s = 0.5 (p = 0.8), grayscale 0.2, no blur, solarize 0 / 0.2 on the two
views; projector and predictor 4096 -> 256; target momentum 0.99 -> 1 (cosine); LARS at lr
1.0 x batch/256 (trust coefficient 0.02), weight decay 1e-5, 10 warmup epochs then cosine.
For a GPU and tfds CIFAR-10 (prepared with internet access).

Expected: solo-learn reports 92.58% top-1 (online linear) for this recipe; lightly reports
86.9% k-NN (k = 200) after 200 epochs at batch 128.

    python train.py --config=configs/byol_resnet18_cifar10.py --workdir=runs/byol_cifar10
"""

from configs import simclr_resnet18_cifar10


def get_config():
    c = simclr_resnet18_cifar10.get_config()
    c.method.name = "byol"
    c.method.color_jitter = 0.5
    c.method.blur = False
    c.method.ema_momentum = 0.99
    c.method.proj_hidden_dim = 4096
    c.method.proj_dim = 256
    c.optim.lr = 1.0
    c.optim.weight_decay = 1e-5
    return c
