"""The main job: ResNet-8 (He et al. 2016, n=1) on the embedded Fashion-MNIST subset, on a CPU.

10 epochs of the 10,000 embedded training images at batch 32 (with XLA's convolution,
resnet8 trained at ~1.4x more images/s at batch 32 than at 128 on a 2-core CPU), evaluated on
the 2,000 embedded test images every 2 epochs. README.md has the measured accuracy and time.

    python train.py                                   # = --config=configs/default.py
    python train.py --config=configs/default.py --workdir=runs/default --config.num_epochs=2
"""

from configs import common


def get_config():
    c = common.base()
    c.model.name = "resnet8"
    c.data.name = "fashion_mnist_mini"
    c.data.batch_size = 32
    c.num_epochs = 10.0
    c.optim.lr = 0.05
    c.evals.every_steps = 624  # 2 epochs
    c.checkpoint.every_steps = 624
    c.logging.every_steps = 50
    return c
