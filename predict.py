"""Top-k labels with confidences for images: `python predict.py` = `python -m zoo.predict`.

    python predict.py --workdir runs/default shoe.jpg photos/
    python predict.py --weights lite0.pth --model tf_efficientnet_lite0 coffee.jpg

See zoo/predict.py for every flag.
"""

import sys

from zoo.predict import cli

if __name__ == "__main__":
    sys.exit(cli())
