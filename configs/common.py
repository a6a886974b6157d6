"""Shared defaults of every config: each config file starts from `base()` and changes fields.

Every key a run can take exists here, so the config is locked (a typo'd override is an error
naming the key) and has one type per key (a wrong type is an error too).
"""

import sys
from typing import NoReturn

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_epochs = 10.0  # used when total_steps is 0
    c.total_steps = 0
    # Fine-tuning (zoo/training/loop.py): start from a zoo workdir's latest checkpoint or a
    # timm/torchvision weights file instead of scratch, unless the workdir has a checkpoint.
    # The classifier head is re-initialised when its number of classes differs.
    c.init_from = ""
    c.init_from_model = ""  # weights file: the registry name whose converter reads it

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet20"
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.drop_path_rate = 0.0
    # Architecture changes ('' / 0 = the registered variant's): a ResNet's "cifar" stem (one
    # 3x3/1 conv, as SimCLR's CIFAR ResNets), a ViT's patch size and position-embedding grid.
    c.model.stem = ""
    c.model.patch_size = 0
    c.model.img_size = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "fashion_mnist_mini"
    c.data.data_dir = ""  # where the dataset's files are, for sources that read files
    c.data.download = True  # tfds: prepare a missing dataset; False fails at once instead
    c.data.batch_size = 128  # global, over all devices and processes
    c.data.eval_batch_size = 500
    c.data.train_ops = "random_crop(padding=2)|flip"  # host per-image ops, see transforms.py
    c.data.eval_ops = ""
    c.data.num_workers = 0  # grain worker processes; 0 = in the main process
    c.data.eval_fraction = 0.1  # held out for eval when a dataset has no eval split
    c.data.split_seed = 0  # seed of that hold-out (independent of `seed`)
    c.data.strict_decode = False  # True: an unreadable image file is an error, not skipped
    # Repeated augmentation (DeiT: 3): each epoch trains on 1/r of the examples, each r times in
    # one batch with different crops, keeping the epoch's length (zoo/data/pipeline.py).
    c.data.repeated_augmentations = 1
    # Normalisation in [0, 1] units; () = the dataset's. Pretrained weights want their own,
    # e.g. (0.5, 0.5, 0.5) for tf_efficientnet_lite0 (zoo.model_entry(name).pretrained).
    c.data.mean = ()
    c.data.std = ()
    # Device batch ops (zoo/data/augment.py), timm's mixup/cutmix: 0 alphas = off.
    c.data.mixup_alpha = 0.0  # Beta(alpha, alpha) mixing weight; timm recipes use 0.8
    c.data.cutmix_alpha = 0.0  # timm recipes use 1.0
    c.data.mix_prob = 1.0  # probability that a batch is mixed at all
    c.data.mix_switch_prob = 0.5  # with both alphas > 0: probability of cutmix over mixup
    # SimCLR/DINO photometric ops, each applied per example with its probability.
    c.data.color_jitter = 0.0  # strength s: brightness/contrast/saturation 0.8s, hue 0.2s
    c.data.color_jitter_prob = 0.8
    c.data.grayscale_prob = 0.0
    c.data.blur_prob = 0.0  # Gaussian blur, sigma uniform in [0.1, 2.0] pixels
    c.data.solarize_prob = 0.0  # pixels above the mid grey are inverted

    c.method = ml_collections.ConfigDict()
    c.method.name = "supervised"
    c.method.label_smoothing = 0.0
    # Multiclass loss: "softmax" cross-entropy, or "sigmoid": binary cross-entropy per class
    # against the (smoothed, mixed) one-hot targets, as timm's "ResNet strikes back" recipes.
    c.method.multiclass_loss = "softmax"
    c.method.bce_target_threshold = 0.0  # sigmoid: targets above it become 1 (timm); 0 = off
    # Binary/multilabel: a sigmoid output at or above this probability counts as positive
    # (accuracy, precision, recall, F1); ROC-AUC and mAP do not depend on it.
    c.method.threshold = 0.5
    # Self-supervised methods (zoo/methods/simclr.py, byol.py, dino.py; 0 = the method's default).
    c.method.temperature = 0.1  # SimCLR's NT-Xent; DINO's student
    c.method.proj_hidden_dim = 0  # projector/head hidden width (SimCLR D, BYOL 2D, DINO 2048)
    c.method.proj_dim = 0  # projection (SimCLR 128, BYOL 256) or DINO's bottleneck (256)
    c.method.crop_size = 0  # side of the random-resized crops; 0 = the dataset's image size
    c.method.crop_min_scale = 0.08  # crops cover this-1 of the image (DINO's global: 0.4)
    c.method.color_jitter = 0.5  # strength s; 0 = no colour jitter and no grayscale
    c.method.blur = True  # Gaussian blur as each paper (off for 32 px images, as on CIFAR)
    c.method.ema_momentum = 0.996  # BYOL/DINO teacher momentum, cosine to 1
    c.method.out_dim = 65536  # DINO: K outputs
    c.method.head_batch_norm = False  # DINO head: BatchNorm in its MLP (as for ResNets)
    c.method.center_momentum = 0.9
    c.method.teacher_temp_start = 0.04
    c.method.teacher_temp = 0.04  # after the warmup; the paper goes up to 0.07
    c.method.teacher_temp_warmup_epochs = 0.0
    c.method.freeze_last_layer_epochs = 1.0
    c.method.num_local_crops = 0  # DINO's local views (the paper: 6 at 96 px, 8 for ViT-S)
    c.method.local_crop_size = 0  # 0 = 96/224 of crop_size
    c.method.local_crop_min_scale = 0.05  # local crops cover this-crop_min_scale

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # sgd | adamw | lars | lamb | rmsprop_tf
    c.optim.lr = 0.1  # peak learning rate (per lr_base_batch images, when that is set)
    c.optim.lr_base_batch = 0  # N > 0: peak lr = lr * data.batch_size / N (linear scaling)
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4  # kernels only; see zoo/training/optim.py
    c.optim.weight_decay_end = -1.0  # >= 0: cosine from weight_decay to this (DINO 0.04 -> 0.4)
    c.optim.trust_coefficient = 1e-3  # LARS
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.rms_decay = 0.9  # rmsprop_tf: decay of the mean squared gradient (TF's rho)
    c.optim.grad_clip_norm = 0.0  # 0 = no clipping
    # k > 1: each step sums the gradients of k micro-batches of data.batch_size / k (the same
    # update as one batch, with the memory of one micro-batch; BatchNorm statistics and SimCLR's
    # negatives are per micro-batch).
    c.optim.grad_accum_steps = 1
    c.optim.mu_dtype = ""  # "bfloat16": the first moment (momentum, Adam's mu) in bf16
    # A NaN/inf loss or gradient stops the run (the last checkpoint is kept intact); True skips
    # such updates instead, stopping only after more than max_skipped in a row.
    c.optim.skip_nonfinite = False
    c.optim.max_skipped = 10
    c.optim.freeze_backbone = False  # True: train the classifier head only (linear probe)
    # Layer-wise lr decay (BEiT): layer i of L gets lr * layer_decay ** (L - i); 1.0 = off.
    c.optim.layer_decay = 1.0
    # EMA of the weights and BatchNorm statistics (zoo/training/ema.py), evaluated beside them
    # (ema_* metrics) and used by zoo.load_classifier: 0 = off; recipes use 0.9999.
    c.optim.ema_decay = 0.0
    c.optim.ema_warmup = True  # decay min(ema_decay, (1 + t) / (10 + t)) at update t, as TF

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"  # cosine | constant | exponential
    c.schedule.warmup_steps = 0  # if 0, warmup_epochs is used
    c.schedule.warmup_epochs = 0.0
    c.schedule.end_lr_factor = 0.0
    # exponential (staircase from step 0, as TF; the warmup overrides its start):
    # lr * decay_rate ** (epochs // decay_epochs)
    c.schedule.decay_rate = 0.97
    c.schedule.decay_epochs = 2.4

    c.evals = ml_collections.ConfigDict()
    c.evals.every_steps = 0  # 0 = once per epoch
    # Evaluators (zoo/training/evaluate.py), comma-separated: classification (a classifier's
    # metrics on the eval split), knn and linear_probe (on the backbone's features: the
    # training split's, made with the eval ops, against the eval split's).
    c.evals.names = "classification"
    c.evals.knn = ml_collections.ConfigDict({"k": 20, "temperature": 0.07})  # as DINO
    c.evals.linear_probe = ml_collections.ConfigDict(
        {"steps": 500, "lr": 0.01, "weight_decay": 1e-4}  # full-batch Adam
    )

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.logging = ml_collections.ConfigDict()
    c.logging.every_steps = 20

    c.parallel = ml_collections.ConfigDict()
    # jit: one program over a ('data',) mesh of all devices (arrays are global); pmap: one
    # program per device with explicit collectives (zoo/parallel.py). Same numbers either way.
    c.parallel.mode = "jit"
    # Several processes (hosts): jax.distributed.initialize with these, or with what the
    # cluster's environment says (SLURM, Open MPI, TPU pods) when num_processes is 0.
    c.parallel.coordinator = ""  # "host:port" of process 0
    c.parallel.num_processes = 0
    c.parallel.process_id = -1
    return c


def deit_augmentation(c: ml_collections.ConfigDict, size: int) -> ml_collections.ConfigDict:
    """DeiT's data recipe (Touvron et al. 2021), which Swin and ConvNeXt kept: Inception crop
    at `size` + flip (bicubic), RandAugment m9 mstd0.5, random erasing 0.25, mixup 0.8 /
    cutmix 1.0, label smoothing 0.1; eval from a resize to size / 0.875, bicubic."""
    c.data.train_ops = (
        f"random_resized_crop(size={size}, interpolation='bicubic')|flip"
        "|rand_augment(magnitude=9, magnitude_std=0.5)|random_erasing(prob=0.25)"
    )
    c.data.eval_ops = f"resize_center_crop(size={size}, crop_pct=0.875, interpolation='bicubic')"
    c.data.mixup_alpha = 0.8
    c.data.cutmix_alpha = 1.0
    c.method.label_smoothing = 0.1
    return c


def runlocal(c: ml_collections.ConfigDict, model_name: str) -> ml_collections.ConfigDict:
    """big_vision's `runlocal`: the same recipe shrunk to a smoke test on a CPU, so that it
    runs in seconds and cannot rot (tests/test_recipes.py runs every recipe this way).

    The family's small-image variant `model_name` (32 px) replaces the model, the embedded
    fashion_mnist_mini the dataset, and the run is 3 steps of 16 images. Everything else of the
    recipe stays: optimizer, schedule (its warmup is cut to fit), loss, EMA, mixup and the
    host ops, whose image size the recipe sets to 32 when `runlocal` is on.
    """
    c.model.name = model_name
    c.data.name = "fashion_mnist_mini"
    c.data.data_dir = ""
    c.data.batch_size = 16
    c.data.eval_batch_size = 500
    c.data.num_workers = 0
    c.total_steps = 3
    c.evals.every_steps = 3
    c.checkpoint.every_steps = 3
    c.logging.every_steps = 1
    return c


def usage_error(message: str) -> NoReturn:
    """A bad config file, flag or argument of train.py: one line on stderr, exit status 2."""
    print(f"train.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`, with a bad flag
    value (one `check_overrides` does not know, e.g. a tuple's) or a stray argument as a
    `usage_error` instead of absl's "FATAL Flags parsing error" and exit status 1."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        usage_error(str(e))
    if len(rest) > 1:
        usage_error(f"unexpected arguments {rest[1:]}; give --config=FILE, --config.KEY=VALUE ...")
    return rest


def load_config_file(path: str, folder: str = "configs") -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, or `get_config(arg)` for "file.py:arg" (as
    ml_collections' config flags, e.g. a recipe's "configs/deit_small_imagenet.py:runlocal");
    ValueError naming the problem and the fix for a missing file (with the config files of its
    folder, else of `folder`), a folder, a file that is not Python or one without
    `get_config`."""
    import difflib
    import pathlib
    import runpy

    path, has_arg, arg = path.partition(":")
    file = pathlib.Path(path)
    if file.is_dir():
        raise ValueError(f"config file '{path}' is a folder; give a .py file in it")
    if not file.is_file():
        where = file.parent if file.parent.is_dir() else pathlib.Path(folder)
        names = sorted(p.name for p in where.glob("*.py") if "\ndef get_config" in p.read_text())
        close = difflib.get_close_matches(file.name, names, n=3, cutoff=0.6)
        hint = (
            f"did you mean: {', '.join(str(where / n) for n in close)}?"
            if close
            else f"config files in {where}: {', '.join(names)}"
        )
        raise ValueError(f"config file '{path}' not found; {hint}")
    try:
        module = runpy.run_path(str(file))
    except SyntaxError as e:
        line = "" if "line" in str(e.msg) else f" (line {e.lineno})"
        raise ValueError(f"config file '{path}' is not Python: {e.msg}{line}") from None
    if not callable(module.get("get_config")):
        raise ValueError(
            f"config file '{path}' has no get_config(); a config file defines get_config() "
            "returning an ml_collections.ConfigDict (see configs/default.py)"
        )
    return module["get_config"](arg) if has_arg else module["get_config"]()


def check_overrides(argv: list[str], default_config: str) -> str | None:
    """Checks the config file and every `--config.a.b=v` of `argv` before absl parses them.

    absl and ml_collections report a missing config file, an unknown key, a value of the wrong
    type or an override before `--config=FILE` with a traceback or a "FATAL Flags parsing
    error"; this returns a one-line message naming the problem and the fix instead (None when
    all is well): the closest existing keys for an unknown one, the type and an example value
    for a wrong one.
    """
    import difflib
    import pathlib

    from absl import flags

    args = argv[1:]
    path, config_at = default_config, None
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            path, config_at = arg.split("=", 1)[1], i
        elif arg == "--config" and i + 1 < len(args):
            path, config_at = args[i + 1], i
    try:
        config = load_config_file(path, str(pathlib.Path(default_config).parent))
    except ValueError as e:
        return str(e)

    def keys(node, prefix=""):
        for key, value in node.items():
            name = f"{prefix}{key}"
            yield name, value
            if isinstance(value, ml_collections.ConfigDict):
                yield from keys(value, name + ".")

    known = dict(keys(config))
    parsers = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser()}
    for i, arg in enumerate(args):
        if not arg.startswith("--config."):
            continue
        if config_at is not None and i < config_at:
            return f"{arg} comes before {args[config_at]}: put --config=FILE first, then overrides"
        key, has_value, text = arg[len("--config.") :].partition("=")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
            sections = [k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)]
            hint = (
                f"did you mean: {', '.join(close)}?"
                if close
                else f"keys are a.b as in {path}, sections: {', '.join(sections)}"
            )
            return f"unknown config key '{key}' in {arg}; {hint}"
        default, parser = known[key], parsers.get(type(known[key]))
        if isinstance(default, ml_collections.ConfigDict):  # would replace the locked section
            fields = ", ".join(f"{key}.{k}" for k in list(default)[:3])
            return f"{arg}: '{key}' is a section; override its keys one by one (e.g. {fields})"
        if has_value and parser is not None:
            try:
                parser.parse(text)
            except (TypeError, ValueError):
                kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
                example = str(default).lower() if isinstance(default, bool) else default
                return (
                    f"{arg}: config key '{key}' takes {kind}, not '{text}' "
                    f"(e.g. --config.{key}={example})"
                )
    return None
