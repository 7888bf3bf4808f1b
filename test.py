"""Segment scans: ``python test.py --infer_overlap 0.5 --pretrained_dir DIR [--input PATH] ...``.

The flags are those of the reference UNETR/BTCV test.py plus --input, --output_dir, --tta ...;
see ``python test.py --help``.
"""

import sys

from btcv_unetr.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
