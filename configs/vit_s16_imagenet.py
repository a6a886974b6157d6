"""ViT-S/16 on ImageNet-1k, big_vision's 90-epoch recipe (Beyer, Zhai and Kolesnikov 2022,
"Better plain ViT baselines for ImageNet-1k"; big_vision/configs/vit_s16_i1k.py; 76.5% top-1
after 90 epochs): batch 1024, Adam (b1 0.9, b2 0.999) lr 1e-3 with 10k warmup steps then cosine,
decoupled weight decay 1e-4, gradient clipping at norm 1, sigmoid cross-entropy, mixup 0.2,
RandAugment(2, 10), Inception crop + flip at 224, inputs in [-1, 1]; the model with global
average pooling, fixed 2-D sin-cos position embeddings and no class token.

big_vision's weight decay is not multiplied by the peak learning rate (w -= wd * lr_t/lr * w);
optax's AdamW multiplies by lr_t, so the same decay is weight_decay = 1e-4 / 1e-3 = 0.1 here.

    python train.py --config=configs/vit_s16_imagenet.py --workdir=runs/vit_s16 \
        --config.data.data_dir=~/tensorflow_datasets --keep_freed_memory
    python train.py --config=configs/vit_s16_imagenet.py:runlocal --workdir=/tmp/smoke
"""

from configs import common


def get_config(arg: str | None = None):
    local = arg == "runlocal"
    size = 32 if local else 224
    c = common.base()
    c.model.name = "vit_small_patch16_224"
    c.model.global_pool = "avg"
    c.model.class_token = False
    c.model.pos_embed = "sincos"
    c.model.fc_norm = False  # big_vision normalises before pooling
    c.data.name = "imagenet2012"
    c.data.batch_size = 1024
    c.data.eval_batch_size = 1000
    c.data.train_ops = f"random_resized_crop(size={size})|flip|rand_augment(magnitude=10)"
    c.data.eval_ops = f"resize_center_crop(size={size}, crop_pct=0.875)"
    c.data.mean = (0.5, 0.5, 0.5)  # big_vision's value_range(-1, 1)
    c.data.std = (0.5, 0.5, 0.5)
    c.data.num_workers = 8
    c.data.mixup_alpha = 0.2
    c.num_epochs = 90.0
    c.method.multiclass_loss = "sigmoid"
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0
    c.optim.mu_dtype = "bfloat16"  # as big_vision's config
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 10_000 * 1024 / 1_281_167  # 10k steps at batch 1024
    c.evals.every_steps = 5000
    c.checkpoint.every_steps = 2000
    c.logging.every_steps = 100
    return common.runlocal(c, "vit_nano_patch4_32") if local else c
