"""The architecture comparison on the full Fashion-MNIST (60k train / 10k test): every backbone
trains with the same data, augmentation, optimizer and budget (`python -m zoo.compare`).

Needs the official IDX files: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) puts them
in /usr/share/datasets/fashion-mnist; elsewhere pass --config.data.data_dir=<folder with them>.
The budget is one epoch (468 steps of 128): each of the five small-image backbones below
(0.3-4 M parameters, 32 px) trains and evaluates in minutes on a 2-core CPU, the slowest
(EfficientNet, ViT) taking roughly twice as long as the ResNet.

    python -m zoo.compare --config=configs/compare_fashion_mnist.py --workdir=runs/compare \
        --models=resnet20,vit_nano_patch4_32,swin_nano_patch2_window4_32,convnext_atto_stem2_32,efficientnet_b0_stem1_32
    # each family's own recipe optimizer (configs/*_imagenet.py) instead of the shared one:
    python -m zoo.compare --config=configs/compare_fashion_mnist.py \
        --workdir=runs/compare_recipe --optim=recipe
"""

from configs import common


def get_config():
    c = common.base()
    c.model.name = "resnet20"  # replaced by each model of --models
    c.data.name = "fashion_mnist"
    c.data.batch_size = 128
    # 28 px images zero-padded to 32 for every model (the 32 px variants' size; a Swin or ViT
    # patch grid needs a side divisible by its patch): training crops 32 of the image padded
    # to 36, i.e. shifts of up to 2 px around the centre, where evaluation puts it.
    c.data.train_ops = "random_crop(padding=4, size=32)|flip"
    c.data.eval_ops = "center_crop(size=32)"
    c.num_epochs = 1.0
    # One optimizer for convolutional and transformer families alike: AdamW trains both from
    # scratch without per-family tuning (SGD is fragile for ViTs). lr 1e-3 is the usual
    # AdamW rate for 1-4M-parameter models at batch 128, above DeiT's 5e-4 x batch / 512,
    # since a one-epoch budget needs fast progress; weight decay 0.05 as DeiT, Swin and
    # ConvNeXt use (kernels only: zoo/training/optim.py).
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.05
    # A short linear warmup (~47 steps): the transformers' attention logits are unstable at
    # full lr from a random start; cosine decay to 0 fits any budget.
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 0.1
    c.evals.every_steps = 0  # once per epoch: at the end of the one-epoch budget
    c.checkpoint.every_steps = 200  # an interrupted model redoes at most 200 steps
    c.checkpoint.keep = 2
    c.logging.every_steps = 50
    return c
