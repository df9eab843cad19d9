"""Tiny model folders for CLI and Hub tests (random weights, built from configs)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from otbr_hub.load import from_model
from otbr_hub.save import save_model


def tiny_timm(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, in_chans=1, num_classes=10)
    return m.to(dtype).eval()


def timm_folder(path: Path, dtype: torch.dtype = torch.float32) -> Path:
    m = tiny_timm(dtype)
    return save_model(from_model(m, input_size=(1, 28, 28), mean=(0.286,), std=(0.353,)), m, path)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=48, num_attention_heads=2,
                    intermediate_size=96, num_labels=10, num_channels=3)
    return ViTForImageClassification(cfg).eval()


def transformers_folder(path: Path) -> Path:
    m = tiny_vit()
    out = save_model(from_model(m), m, path)
    (out / "preprocessor_config.json").write_text(
        '{"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], '
        '"size": {"height": 32, "width": 32}, "do_resize": true, "do_normalize": true, "do_rescale": true}'
    )
    return out
