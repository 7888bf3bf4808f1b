"""The benchmark's model sizes and shapes: the full run (UNETR-B on BTCV-sized scans) and ``--quick``."""

from __future__ import annotations

UNETR_B = {"roi_x": 96, "roi_y": 96, "roi_z": 96, "feature_size": 16, "hidden_size": 768, "mlp_dim": 3072,
           "num_heads": 12}
DEMO_MODEL = {"roi_x": 64, "roi_y": 64, "roi_z": 64, "feature_size": 16, "hidden_size": 192, "mlp_dim": 768,
              "num_heads": 4}
# The Dice check's and the serve check's model: a 32^3 UNETR on 6 mm voxels, trained or served in seconds.
TINY = {"model": {"roi_x": 32, "roi_y": 32, "roi_z": 32, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192,
                  "num_heads": 4},
        "data": {"space_x": 6.0, "space_y": 6.0, "space_z": 6.0, "num_samples": 2, "workers": 0}}
# Seed 0, case 7 of the phantom set: 512 x 512 x 123 at 0.93 x 0.93 x 2.75 mm, a typical BTCV scan.
BTCV_LIKE_CASE = (0, 7)
SETTINGS = {
    "full": {"model": UNETR_B, "spacing": (1.5, 1.5, 2.0), "crops": 4, "matmul": 4096, "repeats": 3,
             "phantom_size": 512, "data_cases": 3, "dice_steps": 300, "loss_steps": 50,
             "picture": {"preset": "base", "size": 256, "batch": 8}},
    "quick": {"model": DEMO_MODEL, "spacing": (3.0, 3.0, 3.0), "crops": 2, "matmul": 2048, "repeats": 2,
              "phantom_size": 128, "data_cases": 2, "dice_steps": 60, "loss_steps": 20,
              "picture": {"preset": "lite", "size": 128, "batch": 4}},
}
