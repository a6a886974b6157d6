"""SimCLR (Chen et al. 2020) on CIFAR-10 with a CIFAR-stem ResNet-18, solo-learn's recipe
(scripts/pretrain/cifar/simclr.yaml): 1000 epochs at batch 256, two views with random-resized
crops 0.08-1 at 32 px, colour jitter s = 1 (0.8, 0.8, 0.8, 0.2; p = 0.8), grayscale 0.2, blur
0.5, flips; projector 2048 -> 256 (zoo's 3-layer SimCLR v2 head), temperature 0.2; LARS at
lr 0.4 x batch/256 (trust coefficient 0.02), weight decay 1e-4 off biases and BatchNorm,
10 warmup epochs then cosine. For a GPU and tfds CIFAR-10 (prepared with internet access).

Expected: solo-learn reports 90.74% top-1 (online linear) for this recipe; lightly reports
84.7% k-NN (k = 200) after 200 epochs at batch 128. zoo's k-NN here uses k = 20 (DINO's).

    python train.py --config=configs/simclr_resnet18_cifar10.py --workdir=runs/simclr_cifar10
"""

from configs import common


def get_config():
    c = common.base()
    c.model.name = "resnet18"
    c.model.stem = "cifar"
    c.data.name = "cifar10"
    c.data.batch_size = 256
    c.data.eval_batch_size = 1000
    c.data.num_workers = 8
    c.num_epochs = 1000.0
    c.method.name = "simclr"
    c.method.crop_size = 32
    c.method.crop_min_scale = 0.08
    c.method.color_jitter = 1.0
    c.method.blur = True
    c.method.temperature = 0.2
    c.method.proj_hidden_dim = 2048
    c.method.proj_dim = 256
    c.optim.name = "lars"
    c.optim.lr = 0.4
    c.optim.lr_base_batch = 256
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.trust_coefficient = 0.02
    c.optim.weight_decay = 1e-4
    c.schedule.warmup_epochs = 10.0
    c.evals.names = "knn,linear_probe"
    c.evals.every_steps = 19_500  # 100 epochs
    c.checkpoint.every_steps = 1950
    c.logging.every_steps = 100
    return c
