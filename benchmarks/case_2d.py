"""2D pictures: an RGB UNETR of the setting's preset, pictures per second and training steps per second."""

from __future__ import annotations

import torch
from case_model import model_passes
from case_train3d import training_step

from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
from btcv_unetr.config.schema import Config


def picture_config(settings: dict, device: str) -> Config:
    """The 2D case: an RGB UNETR of the setting's preset on square pictures, a batch of pictures per step."""
    picture = settings["picture"]
    size = picture["size"]
    return build_config([read_yaml(CONFIG_DIR / f"preset_{picture['preset']}.yaml"),
                         {"model": {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "roi_x": size,
                                    "roi_y": size},
                          "data": {"num_samples": 1}, "train": {"batch_size": picture["batch"]},
                          "infer": {"device": device}}])


def picture_figures(config: Config, device: torch.device, repeats: int) -> dict:
    """Pictures per second through one forward pass (inference) and training steps per second."""
    forward_s = model_passes(config, device, repeats)["forward_s"]
    step = training_step(config, device, repeats)
    return {"images_per_s": 1.0 / forward_s, "train_steps_per_s": 1.0 / step["step_s"], "batch": step["crops"],
            "size": list(config.model.roi_size)}
