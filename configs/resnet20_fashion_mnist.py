"""ResNet-20 (He et al. 2016) on the full Fashion-MNIST (60k train / 10k test).

Needs the official IDX files: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) puts them
in /usr/share/datasets/fashion-mnist; elsewhere pass --config.data.data_dir=<folder with them>.

    python train.py --config=configs/resnet20_fashion_mnist.py --workdir=runs/resnet20_fmnist
"""

from configs import common


def get_config():
    c = common.base()
    c.model.name = "resnet20"
    c.data.name = "fashion_mnist"
    c.data.batch_size = 128
    c.num_epochs = 30.0
    c.optim.lr = 0.1
    c.schedule.warmup_epochs = 1.0
    c.checkpoint.every_steps = 1000
    c.logging.every_steps = 100
    return c
