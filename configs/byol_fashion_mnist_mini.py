"""BYOL (Grill et al. 2020) pretraining of a ResNet-8 on the embedded Fashion-MNIST subset,
on a CPU in minutes; k-NN and linear-probe accuracy on the embedded test split at each eval.

SimCLR's views of configs/simclr_fashion_mnist_mini.py with BYOL's asymmetric solarize (no
blur at 28 px); projector and predictor 256 -> 64; target momentum 0.99 -> 1 (solo-learn's
CIFAR value); LARS at lr 1.0 x batch/256, warmup, cosine; 25 epochs.
README.md (Self-supervised) has the measured accuracy and time.

    python train.py --config=configs/byol_fashion_mnist_mini.py --workdir=runs/byol
"""

from configs import simclr_fashion_mnist_mini


def get_config():
    c = simclr_fashion_mnist_mini.get_config()
    c.num_epochs = 25.0  # BYOL's target network makes a step ~1.3x SimCLR's: 15 CPU minutes
    c.method.name = "byol"
    c.method.ema_momentum = 0.99
    c.method.proj_hidden_dim = 256
    c.method.proj_dim = 64
    return c
