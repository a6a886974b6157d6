"""Binary classification: footwear (sandal, sneaker, ankle boot) vs the rest of the embedded
Fashion-MNIST subset, with a ResNet-8, one logit and sigmoid cross-entropy, on a CPU.

3 epochs of the 10,000 embedded training images (30% footwear) at batch 32, evaluated on the
2,000 embedded test images every epoch: accuracy, precision, recall, F1 (at
method.threshold) and ROC-AUC. See README.md for the measured metrics and wall time.

    python train.py --config=configs/binary_footwear.py --workdir=runs/binary_footwear
"""

from configs import common


def get_config():
    c = common.base()
    c.model.name = "resnet8"
    c.data.name = "fashion_mnist_mini_footwear"
    c.data.batch_size = 32
    c.num_epochs = 3.0
    c.optim.lr = 0.05
    c.evals.every_steps = 312  # 1 epoch
    c.checkpoint.every_steps = 312
    c.logging.every_steps = 50
    return c
