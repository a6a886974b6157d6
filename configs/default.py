"""The main job: a CIFAR-style ResNet on the embedded Fashion-MNIST subset, on a CPU.

python train.py                                   # = --config=configs/default.py
python train.py --config=configs/default.py --workdir=runs/default --config.num_epochs=2
"""

from configs import common


def get_config():
    c = common.base()
    c.model.name = "resnet20"
    c.data.name = "fashion_mnist_mini"
    c.num_epochs = 4.0
    return c
