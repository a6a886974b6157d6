"""SimCLR (Chen et al. 2020) pretraining of a ResNet-8 on the embedded Fashion-MNIST subset,
on a CPU in minutes; k-NN and linear-probe accuracy on the embedded test split at each eval.

Random-resized crops of the 28x28 images (scale 0.2-1; 0.08 leaves too little of a 28-pixel
garment), flips, brightness/contrast jitter (grayscale images: saturation and hue do nothing),
no blur (as SimCLR's CIFAR recipe); NT-Xent at temperature 0.2 over the batch of 256; LARS at
lr 1.0 x batch/256 with warmup, cosine decay. README.md (Self-supervised) has the measured
accuracy and time against the random backbone and raw pixels.

    python train.py --config=configs/simclr_fashion_mnist_mini.py --workdir=runs/simclr
"""

from configs import common


def get_config():
    c = common.base()
    c.model.name = "resnet8"
    c.data.name = "fashion_mnist_mini"
    c.data.batch_size = 256
    c.data.eval_batch_size = 1000
    c.num_epochs = 30.0
    c.method.name = "simclr"
    c.method.temperature = 0.2
    c.method.crop_min_scale = 0.2
    c.method.blur = False
    c.method.proj_hidden_dim = 256
    c.method.proj_dim = 64
    c.optim.name = "lars"
    c.optim.lr = 1.0
    c.optim.lr_base_batch = 256
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 1e-5
    c.schedule.warmup_epochs = 2.0
    c.evals.names = "knn,linear_probe"
    c.evals.every_steps = 390  # 10 epochs
    c.checkpoint.every_steps = 390
    c.logging.every_steps = 10
    return c
