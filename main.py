"""Train UNETR: ``python main.py --data_dir DIR [--json_list dataset_0.json] [--distributed] ...``.

The flags are those of the reference UNETR/BTCV recipe; see ``python main.py --help``.
"""

import sys

from btcv_unetr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
