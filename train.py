"""Trains a model as a config says.

    python train.py                                            # the main job (configs/default.py)
    python train.py --config=configs/resnet20_fashion_mnist.py --workdir=runs/fmnist \
        --config.optim.lr=0.05

Outputs go to --workdir (default runs/<config name>); running again with the same workdir
resumes from its latest checkpoint. SIGTERM or Ctrl-C stops after the current step with a
checkpoint. Several processes (hosts) run the same command, with the config's `parallel` keys
or under SLURM, Open MPI or a TPU pod slice (zoo/training/distributed.py). Exit status: 0 done
(or stopped with a checkpoint), 1 the run failed (diverged, no usable checkpoint), 2 a bad
config, override or input file (found before training starts). --keep_freed_memory: glibc keeps
freed memory for the next step; 224-px models train up to 1.5x faster, small jobs lose time (one
malloc arena), memory is kept until exit (benchmarks/SPEED.md "How zoo sets up XLA:CPU and glibc").
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs.common import check_overrides, parse_flags, usage_error  # noqa: E402
from zoo.cpu import allocator  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = str(ROOT / "configs/default.py")

# ml_collections parses the overrides when the flag is defined: check them first.
if __name__ == "__main__" and (problem := check_overrides(sys.argv, DEFAULT_CONFIG)):
    usage_error(problem)

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Python config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory; default runs/<config file name>.")
flags.DEFINE_bool("keep_freed_memory", False, "glibc keeps freed memory: big jobs run faster.")


def main(argv):
    if flags.FLAGS.keep_freed_memory:  # before JAX starts its threads (zoo/cpu/allocator.py)
        allocator.keep_freed_memory()
    config = flags.FLAGS.config
    from zoo.training import distributed, loop

    config_name = pathlib.Path(flags.FLAGS["config"].config_filename).stem
    logging.set_verbosity(logging.WARNING)
    try:
        distributed.initialize(config.parallel)  # before anything touches a device
        loop.run(config, flags.FLAGS.workdir or str(ROOT / "runs" / config_name))
    except (ValueError, FileNotFoundError, loop.RunFailed) as e:  # zoo's errors say the fix
        if os.environ.get("ZOO_TRACEBACK"):
            raise
        print(f"train.py: {e}\n(set ZOO_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        sys.exit(1 if isinstance(e, loop.RunFailed) else 2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
