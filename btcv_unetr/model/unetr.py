"""UNETR from the config: MONAI's network (ViT-B encoder with a perceptron patch embedding, convolutional decoder with
instance norm and residual blocks), and deeper variants for the presets."""

from __future__ import annotations

import re
from typing import Any

import torch
from monai.networks.nets import UNETR, ViT

from ..config.schema import ModelConfig

# Built by MONAI's TransformerBlock but only used with cross-attention, which UNETR never enables.
UNUSED_PARAMETERS = re.compile(r"\.norm_cross_attn\.")


class DeeperUNETR(UNETR):
    """MONAI's UNETR with a ViT of ``num_layers`` blocks (MONAI fixes 12, ViT-L has 24).

    The decoder's skip connections come from the blocks a quarter, half and three quarters of the way
    down, as blocks 3, 6 and 9 of 12 do in MONAI's UNETR; the state-dict keys are MONAI's.
    """

    def __init__(self, num_layers: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        old = self.vit
        self.vit = ViT(in_channels=kwargs["in_channels"], img_size=kwargs["img_size"], patch_size=self.patch_size,
                       hidden_size=kwargs["hidden_size"], mlp_dim=kwargs["mlp_dim"], num_layers=num_layers,
                       num_heads=kwargs["num_heads"], proj_type=kwargs["proj_type"], classification=False,
                       dropout_rate=kwargs["dropout_rate"], spatial_dims=kwargs["spatial_dims"])
        del old

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden = self.vit(x_in)
        quarter = self.num_layers // 4
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden[quarter]))
        enc3 = self.encoder3(self.proj_feat(hidden[2 * quarter]))
        enc4 = self.encoder4(self.proj_feat(hidden[3 * quarter]))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))


def build_unetr(config: ModelConfig) -> UNETR:
    """MONAI UNETR from the config; parameters that never receive a gradient are frozen.

    Input ``(B, in_channels, roi_x, roi_y, roi_z)``; output logits ``(B, out_channels, roi_x, roi_y, roi_z)``
    (in 2D without ``roi_z``).
    Freezing the unused LayerNorms lets DDP run without ``find_unused_parameters``.
    """
    arguments = dict(spatial_dims=config.spatial_dims, in_channels=config.in_channels,
                     out_channels=config.out_channels, img_size=config.roi_size, feature_size=config.feature_size,
                     hidden_size=config.hidden_size, mlp_dim=config.mlp_dim, num_heads=config.num_heads,
                     proj_type=config.pos_embed, norm_name=config.norm_name, conv_block=config.conv_block,
                     res_block=config.res_block, dropout_rate=config.dropout_rate)
    model = UNETR(**arguments) if config.num_layers == 12 else DeeperUNETR(config.num_layers, **arguments)
    for name, parameter in model.named_parameters():
        if UNUSED_PARAMETERS.search(name):
            parameter.requires_grad_(False)
    return model
