"""Architecture sweep: which image classifiers ``repair`` and ``scan`` handle.

Every case is a tiny model with random weights built from a config (nothing is
downloaded): all timm ``test_*`` models, small versions of common timm families and
transformers ``*ForImageClassification`` models from tiny configs. For each case:

* ``repair``: ``otbr_hub.repair(model, prune_ratio=0.05)`` at a cheap unlearning budget;
  checked: same class, same state-dict keys and shapes, some weight changed, finite
  logits of the right width on random inputs;
* ``auto``: the same with ``prune_ratio="auto"`` (detector off, so the ratio walk and
  the agreement guard are what is exercised; ``--auto-detector`` turns the margin detector on);
* ``scan``: ``otbr_hub.scan(model)`` with a small detector budget; checked: a verdict
  (clean / suspicious / backdoored), not an error or a skip;
* ``save``: the repaired model saved with :func:`otbr_hub.save.save_model` and read back with
  :func:`otbr_hub.load.load_folder` (timm and transformers only); checked: same class,
  same tensors, same logits.

A cell is ``ok``, ``-`` (not applicable) or the first line of what went wrong. Cases run
one after the other in this process with a per-case time limit.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/archs.py                 # everything, table + JSON
    OMP_NUM_THREADS=1 python benchmarks/archs.py --only 'vit|deit' --no-json
    OMP_NUM_THREADS=1 python benchmarks/archs.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "archs-cpu.json"
NUM_CLASSES = 7  # an unusual width, so a layer with this many outputs is a class head
CHEAP = dict(unlearn_steps=2, unlearn_batch=8, verify_samples=8, device="cpu")


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_size: tuple[int, int, int] | None = None  # None: read from the model's config
    auto: bool = True


# --------------------------------------------------------------------------- model builders


def _timm(arch: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kw).eval()

    return build


def _timm_class(path: str, **kw: Any) -> Callable[[], nn.Module]:
    """A timm model class instantiated directly (no registry name, no pretrained_cfg)."""

    def build() -> nn.Module:
        import importlib

        module, cls = path.split(":")
        if kw.get("block_layer") == "resmlp":
            from timm.models.mlp_mixer import Affine, ResBlock

            kw.update(block_layer=ResBlock, norm_layer=Affine)
        torch.manual_seed(0)
        return getattr(importlib.import_module(module), cls)(num_classes=NUM_CLASSES, **kw).eval()

    return build


def _hf(config_cls: str, model_cls: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_cls)(num_labels=NUM_CLASSES, **kw)
        return getattr(transformers, model_cls)(cfg).eval()

    return build


def _timm_test_cases() -> list[Case]:
    import timm

    return [Case(f"timm:{n}", _timm(n)) for n in timm.list_models("test_*")]


def _timm_family_cases() -> list[Case]:
    s32, s64 = (3, 32, 32), (3, 64, 64)
    return [
        Case("timm:resnet18-tiny", _timm("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8), s32),
        Case("timm:resnet26d-tiny", _timm("resnet26d", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8), s32),
        Case("timm:resnext50-tiny", _timm("resnext50_32x4d", layers=[1, 1, 1, 1], channels=(16, 32, 64, 128),
                                          cardinality=4, base_width=4, stem_width=8), s32),
        Case("timm:seresnet18-tiny", _timm("seresnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8), s32),
        Case("timm:regnetx_002", _timm("regnetx_002"), s32),
        Case("timm:regnety_002", _timm("regnety_002"), s32),
        Case("timm:tinynet_e", _timm("tinynet_e"), s32),
        Case("timm:tf_mobilenetv3_small_minimal", _timm("tf_mobilenetv3_small_minimal_100"), s32),
        Case("timm:lcnet_050", _timm("lcnet_050"), s32),
        Case("timm:mobilenetv3_small_050", _timm("mobilenetv3_small_050"), s32),
        Case("timm:mobilenetv2_050", _timm("mobilenetv2_050"), s32),
        Case("timm:densenet-tiny", _timm("densenet121", growth_rate=8, block_config=(2, 2)), s32),
        Case("timm:convnext-tiny", _timm("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)), s32),
        Case("timm:convnext-convmlp", _timm("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), conv_mlp=True), s32),
        Case("timm:vit-tiny", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2), s32),
        Case("timm:vit-gap-noclass", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                                           num_heads=2, class_token=False, global_pool="avg", fc_norm=True), s32),
        Case("timm:vit-reg", _timm("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                                   reg_tokens=2, no_embed_class=True), s32),
        Case("timm:deit-distilled", _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2,
                                          embed_dim=48, num_heads=2), s32),
        Case("timm:swin-tiny", _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                                     depths=(1, 1), num_heads=(1, 2), embed_dim=16), s32),
        Case("timm:levit-128s", _timm("levit_128s", img_size=64), s64),
        Case("timm:levit-conv-128s", _timm("levit_conv_128s", img_size=64), s64),
        Case("timm:mixer-tiny", _timm_class("timm.models.mlp_mixer:MlpMixer", img_size=32, patch_size=8, num_blocks=2,
                                            embed_dim=32), s32),
        Case("timm:resmlp-tiny", _timm_class("timm.models.mlp_mixer:MlpMixer", img_size=32, patch_size=8, num_blocks=2,
                                             embed_dim=32, mlp_ratio=4, block_layer="resmlp"), s32),
        Case("timm:mobilevit_xxs", _timm("mobilevit_xxs"), s64),
        Case("timm:repvgg-tiny", _timm("repvgg_a0"), s32),
        Case("timm:ghostnet_050", _timm("ghostnet_050"), s32),
        Case("timm:dla-tiny", _timm("dla34", levels=[1, 1, 1, 1, 1, 1], channels=[8, 16, 16, 32, 32, 64]), s32),
        Case("timm:inception_next-tiny", _timm("inception_next_atto", depths=(1, 1, 1, 1)), s32),
        Case("timm:efficientformer", _timm("efficientformerv2_s0", img_size=64), s64),
        Case("timm:fastvit_t8", _timm("fastvit_t8"), s64),
    ]


def _hf_cases() -> list[Case]:
    small_vit = dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=48, num_attention_heads=2,
                     intermediate_size=96)
    return [
        Case("hf:resnet", _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16],
                              depths=[1, 1], layer_type="basic")),
        Case("hf:resnet-bottleneck", _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=8,
                                         hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"), (3, 32, 32)),
        Case("hf:convnext", _hf("ConvNextConfig", "ConvNextForImageClassification", num_stages=2, hidden_sizes=[8, 16],
                                depths=[1, 1], image_size=32)),
        Case("hf:convnextv2", _hf("ConvNextV2Config", "ConvNextV2ForImageClassification", num_stages=2,
                                  hidden_sizes=[8, 16], depths=[1, 1], image_size=32)),
        Case("hf:vit", _hf("ViTConfig", "ViTForImageClassification", **small_vit)),
        Case("hf:deit", _hf("DeiTConfig", "DeiTForImageClassification", **small_vit)),
        Case("hf:deit-teacher", _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", **small_vit)),
        Case("hf:beit", _hf("BeitConfig", "BeitForImageClassification", use_relative_position_bias=True,
                            use_mean_pooling=True, **small_vit)),
        Case("hf:data2vec-vision", _hf("Data2VecVisionConfig", "Data2VecVisionForImageClassification", **small_vit)),
        Case("hf:dinov2", _hf("Dinov2Config", "Dinov2ForImageClassification", image_size=32, patch_size=8,
                              num_hidden_layers=2, hidden_size=48, num_attention_heads=2, mlp_ratio=2)),
        Case("hf:dinov2-registers", _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                                        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=48,
                                        num_attention_heads=2, mlp_ratio=2, num_register_tokens=2)),
        Case("hf:vit_msn", _hf("ViTMSNConfig", "ViTMSNForImageClassification", **small_vit)),
        Case("hf:swin", _hf("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=2, embed_dim=16,
                            depths=[1, 1], num_heads=[1, 2], window_size=4)),
        Case("hf:swinv2", _hf("Swinv2Config", "Swinv2ForImageClassification", image_size=32, patch_size=2, embed_dim=16,
                              depths=[1, 1], num_heads=[1, 2], window_size=4)),
        Case("hf:mobilenet_v1", _hf("MobileNetV1Config", "MobileNetV1ForImageClassification", image_size=32,
                                    depth_multiplier=0.25)),
        Case("hf:mobilenet_v2", _hf("MobileNetV2Config", "MobileNetV2ForImageClassification", image_size=32,
                                    depth_multiplier=0.35)),
        Case("hf:efficientnet", _hf("EfficientNetConfig", "EfficientNetForImageClassification", image_size=32,
                                    width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)),
        Case("hf:regnet", _hf("RegNetConfig", "RegNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16],
                              depths=[1, 1], groups_width=4), (3, 32, 32)),
        Case("hf:bit", _hf("BitConfig", "BitForImageClassification", embedding_size=8, hidden_sizes=[16, 32],
                           depths=[1, 1], num_groups=4), (3, 32, 32)),
        Case("hf:levit", _hf("LevitConfig", "LevitForImageClassification", image_size=64)),
        Case("hf:levit-teacher", _hf("LevitConfig", "LevitForImageClassificationWithTeacher", image_size=64)),
        Case("hf:poolformer", _hf("PoolFormerConfig", "PoolFormerForImageClassification", depths=[1, 1, 1, 1],
                                  hidden_sizes=[8, 16, 32, 64]), (3, 32, 32)),
        Case("hf:cvt", _hf("CvtConfig", "CvtForImageClassification", embed_dim=[16, 32, 48], num_heads=[1, 2, 3],
                           depth=[1, 2, 3]), (3, 32, 32)),  # depth[i] > i: transformers indexes by stage
        Case("hf:mobilevit", _hf("MobileViTConfig", "MobileViTForImageClassification", image_size=64,
                                 hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])),
        Case("hf:segformer", _hf("SegformerConfig", "SegformerForImageClassification", depths=[1, 1, 1, 1],
                                 hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2]), (3, 32, 32)),
        Case("hf:pvt", _hf("PvtConfig", "PvtForImageClassification", image_size=32, depths=[1, 1, 1, 1],
                           hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2])),
        Case("hf:focalnet", _hf("FocalNetConfig", "FocalNetForImageClassification", image_size=32, embed_dim=16,
                                depths=[1, 1], hidden_sizes=[16, 32])),
        Case("hf:swiftformer", _hf("SwiftFormerConfig", "SwiftFormerForImageClassification", depths=[1, 1, 1, 1],
                                   embed_dims=[8, 16, 32, 48]), (3, 32, 32)),
        Case("hf:hiera", _hf("HieraConfig", "HieraForImageClassification", image_size=[64, 64], embed_dim=16,
                             depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])),
        Case("hf:mobilevitv2", _hf("MobileViTV2Config", "MobileViTV2ForImageClassification", image_size=64,
                                   width_multiplier=0.25)),
        Case("hf:pvt_v2", _hf("PvtV2Config", "PvtV2ForImageClassification", image_size=32, depths=[1, 1, 1, 1],
                              hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2])),
        Case("hf:hgnet_v2", _hf("HGNetV2Config", "HGNetV2ForImageClassification"), (3, 32, 32)),
        Case("hf:textnet", _hf("TextNetConfig", "TextNetForImageClassification"), (3, 32, 32)),
        Case("hf:pp_lcnet", _hf("PPLCNetConfig", "PPLCNetForImageClassification", scale=0.25), (3, 32, 32)),
        Case("hf:ijepa", _hf("IJepaConfig", "IJepaForImageClassification", **small_vit)),
        Case("hf:donut-swin", _hf("DonutSwinConfig", "DonutSwinForImageClassification", image_size=32, patch_size=2,
                                  embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)),
        Case("hf:clip", _hf("CLIPConfig", "CLIPForImageClassification", vision_config=_small_tower(),
                            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2))),
        Case("hf:siglip", _hf("SiglipConfig", "SiglipForImageClassification", vision_config=_small_tower(),
                              text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2))),
        Case("hf:imagegpt", _hf("ImageGPTConfig", "ImageGPTForImageClassification", n_embd=16, n_layer=1, n_head=2,
                                n_positions=64), (3, 8, 8)),
        Case("hf:perceiver", _hf("PerceiverConfig", "PerceiverForImageClassificationLearned", num_latents=8,
                                 d_latents=16, d_model=32, num_blocks=1, num_self_attends_per_block=1,
                                 num_self_attention_heads=1, num_cross_attention_heads=1, image_size=32), (3, 32, 32)),
    ]


def _small_tower() -> dict[str, Any]:
    return dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=48, num_attention_heads=2,
                intermediate_size=96)


class _WeightNormCNN(nn.Module):
    """Convs under weight normalisation (the weight is recomputed from g and v every forward)."""

    def __init__(self) -> None:
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.conv1 = wn(nn.Conv2d(3, 8, 3, padding=1))
        self.conv2 = wn(nn.Conv2d(8, 16, 3, padding=1))
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class _DictOutputCNN(nn.Module):
    """A plain torch classifier that returns a dict with 'logits' and 'features'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x))))).mean((2, 3))
        return {"logits": self.fc(f), "features": f}


def _torch(cls: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls().eval()

    return build


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kw).eval()

    return build


def _tv_class(path: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import importlib

        module, cls = path.split(":")
        torch.manual_seed(0)
        return getattr(importlib.import_module(f"torchvision.models.{module}"), cls)(num_classes=NUM_CLASSES, **kw).eval()

    return build


def _torch_cases() -> list[Case]:
    s32 = (3, 32, 32)
    return [
        Case("torchvision:resnet18", _tv("resnet18"), s32),
        Case("torchvision:mobilenet_v3_small", _tv("mobilenet_v3_small", width_mult=0.25), s32),
        Case("torchvision:shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), s32),
        Case("torchvision:squeezenet1_1", _tv("squeezenet1_1"), (3, 64, 64)),
        Case("torchvision:googlenet-aux", _tv("googlenet", aux_logits=True, init_weights=True), (3, 64, 64)),
        Case("torchvision:vit-tiny", _tv_class("vision_transformer:VisionTransformer", image_size=32, patch_size=8,
                                               num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64), s32),
        Case("torchvision:swin-tiny", _tv_class("swin_transformer:SwinTransformer", patch_size=[2, 2], embed_dim=16,
                                                depths=[1, 1], num_heads=[1, 2], window_size=[4, 4]), s32),
        Case("torch:weight-norm-cnn", _torch(_WeightNormCNN), s32),
        Case("torch:dict-output-cnn", _torch(_DictOutputCNN), s32),
        Case("timm:resnet18-gray-nonsquare", _timm("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64),
                                                   stem_width=8, in_chans=1), (1, 32, 48)),
    ]


def all_cases() -> list[Case]:
    return _timm_test_cases() + _timm_family_cases() + _hf_cases() + _torch_cases()


# --------------------------------------------------------------------------- checks


class _TimeLimit(BaseException):
    """Raised by SIGALRM. Not an Exception, so the per-step ``except Exception`` handlers that
    record a failing step let it through to the per-case time limit."""


def _alarm(_sig: int, _frame: Any) -> None:
    raise _TimeLimit()


def _one_line(err: BaseException) -> str:
    if isinstance(err, _TimeLimit):
        return "time limit"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"[:200]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from otbr_hub.load import forward_logits

    with torch.no_grad():
        return forward_logits(model.eval(), x)


def check_repaired(original: nn.Module, before: dict[str, torch.Tensor], repaired: nn.Module,
                   spec: Any) -> str:
    """'ok' or what is wrong with a repaired model."""
    if type(repaired) is not type(original):
        return f"model type changed: {type(repaired).__name__}"
    after = repaired.state_dict()
    if after.keys() != before.keys():
        return "state-dict keys changed"
    bad = [k for k in before if before[k].shape != after[k].shape]
    if bad:
        return f"shape changed: {bad[0]}"
    if not any(not torch.equal(before[k], after[k]) for k in before):
        return "no weight changed"
    if any(not torch.equal(before[k], v) for k, v in original.state_dict().items()):
        return "input model was modified"
    x = torch.rand(2, spec.channels, spec.height, spec.width)
    y = _logits(repaired, spec.normalize(x))
    if y.shape != (2, spec.num_classes):
        return f"logits shape {tuple(y.shape)}"
    if not torch.isfinite(y).all():
        return "output not finite"
    return "ok"


def _is_class_head(model: nn.Module, name: str) -> bool:
    """A Linear/Conv whose outputs are the classes (main, distillation or auxiliary head)."""
    mod = dict(model.named_modules()).get(name)
    weight = getattr(mod, "weight", None)
    return weight is not None and weight.shape[0] == NUM_CLASSES


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    import otbr_hub
    from otbr_hub.detect import DetectSettings
    from otbr_hub.scan import ScanSettings, scan

    row: dict[str, Any] = {"name": case.name}
    t0 = time.perf_counter()
    try:
        model = case.build()
    except Exception as err:
        row.update(build=_one_line(err), seconds=round(time.perf_counter() - t0, 2))
        return row
    row["build"] = "ok"
    row["class"] = type(model).__name__
    row["params"] = sum(p.numel() for p in model.parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kw = dict(CHEAP, input_size=case.input_size)
    result = None

    t = time.perf_counter()
    try:
        result = otbr_hub.repair(model, prune_ratio=0.05, detector=False, **kw)
        row["repair"] = check_repaired(model, before, result.model, result.source.spec)
        heads = [n for n in result.report.pruned_per_layer if _is_class_head(model, n)]
        if row["repair"] == "ok" and heads:
            row["repair"] = f"pruned class rows of {heads[0]}"
        row["layers_scored"] = result.report.layers_scored
        row["neurons_pruned"] = result.report.neurons_pruned
        row["agreement"] = result.report.verification.get("agreement")
        row["bounds"] = "applied" if result.report.clipping.get("applied") else result.report.clipping.get("reason")
    except Exception as err:
        row["repair"] = _one_line(err)
        if args.traceback:
            traceback.print_exc()
    row["repair_s"] = round(time.perf_counter() - t, 2)

    if case.auto and not args.no_auto:
        t = time.perf_counter()
        try:
            auto = otbr_hub.repair(model, prune_ratio="auto", detector=None if args.auto_detector else False, **kw)
            row["auto"] = check_repaired(model, before, auto.model, auto.source.spec)
            row["auto_ratio"] = auto.report.prune_ratio
        except Exception as err:
            row["auto"] = _one_line(err)
        row["auto_s"] = round(time.perf_counter() - t, 2)
    else:
        row["auto"] = "-"

    t = time.perf_counter()
    try:
        ds = DetectSettings(inputs_per_class=2, steps=5, screen_steps=2, max_batch=64)
        rep = scan(model, settings=ScanSettings(detector=ds), input_size=case.input_size)
        target = rep.targets[0]
        if target.verdict in ("clean", "suspicious", "backdoored"):
            row["scan"] = "ok"
            row["verdict"] = target.verdict
        else:
            row["scan"] = f"{target.verdict}: {target.error or target.skipped}"[:200]
        if any(not torch.equal(before[k], v) for k, v in model.state_dict().items()):
            row["scan"] = "scan modified the model"
    except Exception as err:
        row["scan"] = _one_line(err)
    row["scan_s"] = round(time.perf_counter() - t, 2)

    row["save"] = "-"
    if result is not None and result.source.library in ("timm", "transformers"):
        from otbr_hub.load import load_folder
        from otbr_hub.save import save_model

        t = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = save_model(result.source, result.model, Path(tmp) / "m")
                back = load_folder(out)
                sd_a, sd_b = result.model.state_dict(), back.model.state_dict()
                spec = result.source.spec
                if type(back.model) is not type(result.model):
                    row["save"] = f"reloaded as {type(back.model).__name__}"
                elif sd_a.keys() != sd_b.keys() or any(not torch.equal(sd_a[k], sd_b[k]) for k in sd_a):
                    row["save"] = "reloaded tensors differ"
                elif (back.spec.height, back.spec.width, back.spec.num_classes) != (spec.height, spec.width, spec.num_classes):
                    row["save"] = f"reloaded input spec differs: {back.spec.to_dict()}"
                else:
                    x = spec.normalize(torch.rand(2, spec.channels, spec.height, spec.width))
                    same = torch.allclose(_logits(result.model, x), _logits(back.model, x), atol=1e-5, rtol=1e-4)
                    row["save"] = "ok" if same else "reloaded logits differ"
        except Exception as err:
            row["save"] = _one_line(err)
        row["save_s"] = round(time.perf_counter() - t, 2)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# --------------------------------------------------------------------------- output


def _cell(v: Any, width: int) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= width else s[: width - 1] + "~"


def print_table(rows: list[dict[str, Any]], width: int = 60) -> None:
    cols = ("name", "repair", "auto", "scan", "save", "seconds")
    widths = {c: max(len(c), *(len(_cell(r.get(c, r.get("build") if c == "repair" else ""), width)) for r in rows))
              for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        vals = dict(r)
        if r.get("build") != "ok":
            vals["repair"] = f"build failed: {r.get('build')}"
        print("  ".join(_cell(vals.get(c, ""), width).ljust(widths[c]) for c in cols))


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    built = [r for r in rows if r.get("build") == "ok"]
    out = {"cases": len(rows), "built": len(built)}
    for col in ("repair", "auto", "scan", "save"):
        out[f"{col}_ok"] = sum(r.get(col) == "ok" for r in built)
        out[f"{col}_failed"] = sum(r.get(col) not in ("ok", "-", None) for r in built)
    out["bounds_applied"] = sum(r.get("bounds") == "applied" for r in built)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="regex on case names")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--no-auto", action="store_true", help="skip the prune_ratio='auto' repair")
    ap.add_argument("--auto-detector", action="store_true", help="let 'auto' use the default margin detector")
    ap.add_argument("--time-limit", type=int, default=240, help="seconds per case")
    ap.add_argument("--no-json", action="store_true", help=f"do not write {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--traceback", action="store_true", help="print tracebacks of repair failures")
    args = ap.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.name)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for case in cases:
        signal.alarm(args.time_limit)
        try:
            row = run_case(case, args)
        except _TimeLimit:
            row = {"name": case.name, "build": "ok", "repair": "time limit"}
        finally:
            signal.alarm(0)
        rows.append(row)
        print(f"{case.name}: repair={row.get('repair', row.get('build'))} auto={row.get('auto')} "
              f"scan={row.get('scan')} save={row.get('save')} ({row.get('seconds')} s)", file=sys.stderr, flush=True)
    print()
    print_table(rows)
    summ = summary(rows)
    print()
    print(json.dumps(summ))
    if not args.no_json:
        from speed import command_line, machine, write_json

        payload = {
            "command": command_line(),
            "machine": machine(),
            "settings": {"repair": {**CHEAP, "prune_ratio": 0.05}, "num_classes": NUM_CLASSES,
                         "scan_detector": {"inputs_per_class": 2, "steps": 5, "screen_steps": 2, "max_batch": 64}},
            "summary": summ,
            "rows": rows,
        }
        write_json(args.output, payload)
        print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
