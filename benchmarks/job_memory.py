"""Peak memory of one service job against the estimate that ``btcv-unetr serve`` refuses uploads by.

    python benchmarks/job_memory.py [--shape 256x256x160] [--spacing 0.8x0.8x1.0] [--classes 14] [--dtype int16]

Writes a random scan of that shape and spacing, builds a small UNETR (ROI 32^3, feature 8) whose grid is
BTCV's 1.5 x 1.5 x 2.0 mm with ``--classes`` classes, and runs a job's steps in this process as the
service's worker does (preprocessing, sliding window, inversion to the scan, the mask written). Prints
the peak resident memory over the loaded model (``ru_maxrss``) and ``serve.limits.job_memory_bytes`` for
the same header, as JSON. One process per shape: a peak is only ever the process's largest so far.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from btcv_unetr.config.load import (  # noqa: E402
    CONFIG_DIR,
    build_config,
    read_yaml,  # noqa: E402
)
from btcv_unetr.data.images import write_mask  # noqa: E402
from btcv_unetr.inference.loader import with_weights_file
from btcv_unetr.inference.predictor import Predictor  # noqa: E402
from btcv_unetr.serve.limits import Declared, job_memory_bytes  # noqa: E402
from btcv_unetr.testing.checkpoints import seeded_checkpoint  # noqa: E402

BTCV_SPACING = (1.5, 1.5, 2.0)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def measure(shape: tuple[int, int, int], spacing: tuple[float, float, float], classes: int, dtype: str,
            folder: Path) -> dict:
    scan = folder / "scan.nii.gz"
    data = np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16).astype(dtype)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), scan)
    del data
    config = build_config([read_yaml(CONFIG_DIR / "tiny.yaml"), {
        "model": {"out_channels": classes}, "train": {"precision": "fp32"},
        "data": dict(zip(("space_x", "space_y", "space_z"), BTCV_SPACING)),
        "infer": {"infer_overlap": 0.0, "sw_batch_size": 1}}])
    predictor = Predictor(with_weights_file(config, seeded_checkpoint(folder / "model.pt", config)))
    loaded = max(resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    image = predictor.prepare(scan)
    labels, _ = predictor.to_scan(predictor.probabilities(image), image, keep_probabilities=False)
    write_mask(labels, scan, folder / "mask.nii.gz", provenance=predictor.provenance())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    declared = Declared(shape, spacing, 1, np.dtype(dtype).itemsize)
    estimate = job_memory_bytes(declared, predictor.config.model, BTCV_SPACING, predictor.sw_batch_size)
    return {"shape": list(shape), "spacing": list(spacing), "classes": classes, "dtype": dtype,
            "grid_shape": list(image.shape[1:]), "measured_gb": (peak - loaded) / 2**30,
            "estimate_gb": estimate / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="256x256x160")
    parser.add_argument("--spacing", default="0.8x0.8x1.0")
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--dtype", default="int16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split("x"))
    spacing = tuple(float(v) for v in args.spacing.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(measure(shape, spacing, args.classes, args.dtype, Path(folder))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
