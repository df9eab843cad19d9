"""Repair and scan across architecture families the other tests do not cover: distillation
heads, heads wrapped with a norm, grouped/depthwise convs, BatchNorm after Linear, conv
classifiers, dict outputs, CLIP-style configs, and the models that must be refused with a
one-line error. Tiny random-weight models, cheap budgets; benchmarks/archs.py is the full
sweep these come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import otbr_hub
from otbr_hub.detect import DetectSettings
from otbr_hub.errors import OtbrError, UnsupportedModelError
from otbr_hub.layers import classifier_names, select_layers
from otbr_hub.load import forward_logits, from_model, load_folder
from otbr_hub.prune import prune
from otbr_hub.save import save_model
from otbr_hub.scan import ScanSettings, scan
from otbr_hub.score import Scores
from otbr_hub.settings import preset

CLASSES = 7  # no hidden layer in these models is 7 wide, so a 7-row layer is a class head
FAST = dict(unlearn_steps=2, unlearn_batch=8, verify_samples=8, device="cpu", detector=False)
SCAN = ScanSettings(detector=DetectSettings(inputs_per_class=2, steps=5, screen_steps=2))
S32 = (3, 32, 32)


def _timm(name, **kw):
    def build():
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=CLASSES, **kw).eval()

    return build


def _hf(config_cls, model_cls, **kw):
    def build():
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=CLASSES, **kw)).eval()

    return build


def _tv(name, **kw):
    def build():
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **kw).eval()

    return build


class DictOutput(nn.Module):
    """Plain torch: a grouped conv, and a dict output with the logits under 'logits'."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        f = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x))))).mean((2, 3))
        return {"logits": self.fc(f), "features": f}


def _dict_output():
    torch.manual_seed(0)
    return DictOutput().eval()


VIT = dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=48, num_attention_heads=2, intermediate_size=96)

# name: (builder, input size or None for the model's own, class heads expected)
CASES = {
    "timm-deit-distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                                  num_heads=2), S32, {"head", "head_dist"}),
    "timm-levit": (_timm("levit_128s", img_size=64), (3, 64, 64), {"head.linear", "head_dist.linear"}),
    "timm-resnext-grouped": (_timm("resnext50_32x4d", layers=[1, 1, 1, 1], channels=(16, 32, 64, 128), cardinality=4,
                                   base_width=4, stem_width=8), S32, {"fc"}),
    "timm-mobilenetv3-depthwise-se": (_timm("mobilenetv3_small_050"), S32, {"classifier"}),
    "timm-swin": (_timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, depths=(1, 1),
                        num_heads=(1, 2), embed_dim=16), S32, {"head.fc"}),
    "hf-deit-teacher": (_hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", **VIT), None,
                        {"cls_classifier", "distillation_classifier"}),
    "hf-swiftformer": (_hf("SwiftFormerConfig", "SwiftFormerForImageClassification", depths=[1, 1, 1, 1],
                           embed_dims=[8, 16, 32, 48]), S32, {"head", "dist_head"}),
    "hf-clip": (_hf("CLIPConfig", "CLIPForImageClassification", vision_config=VIT,
                    text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
                None, {"classifier"}),
    "torchvision-squeezenet-conv-head": (_tv("squeezenet1_1"), (3, 64, 64), {"classifier.1"}),
    "torch-dict-output": (_dict_output, S32, {"fc"}),
}


def _logits(model, x):
    with torch.no_grad():
        return forward_logits(model.eval(), x)


@pytest.mark.parametrize("case", list(CASES))
def test_repair_keeps_the_model_and_leaves_every_class_head_alone(case):
    build, size, heads = CASES[case]
    model = build()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert set(classifier_names(model)) == heads

    res = otbr_hub.repair(model, prune_ratio=0.05, input_size=size, **FAST)

    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    assert type(res.model) is type(model)
    after = res.model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == before[k].shape and after[k].dtype == before[k].dtype for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    rep = res.report
    assert rep.neurons_pruned == max(1, int(0.05 * rep.neurons_scored)) and rep.fusion["fused_layers"] >= 1
    assert not heads & set(rep.pruned_per_layer)
    for name in heads:  # the class rows are exactly as they were
        w, w0 = after[f"{name}.weight"], before[f"{name}.weight"]
        if rep.clipping["applied"]:
            # activation bounds rescale the residual stream the head reads, and undo it in the
            # head's input columns: every column is the original times one positive factor
            ratio = w / w0
            assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-4) and (ratio > 0).all(), name
            assert torch.equal(after[f"{name}.bias"], before[f"{name}.bias"]), name
        else:
            assert torch.equal(w, w0), name
    spec = res.source.spec
    y = _logits(res.model, spec.normalize(torch.rand(3, spec.channels, spec.height, spec.width)))
    assert y.shape == (3, CLASSES) and torch.isfinite(y).all()


@pytest.mark.parametrize("case", ["timm-deit-distilled", "hf-deit-teacher", "timm-mobilenetv3-depthwise-se", "torch-dict-output"])
def test_scan_gives_a_verdict(case):
    build, size, _ = CASES[case]
    target = scan(build(), settings=SCAN, input_size=size).targets[0]
    assert target.verdict in ("clean", "suspicious", "backdoored"), (target.error, target.skipped)
    assert target.backdoor is not None and len(target.backdoor.per_class) == CLASSES


def test_auto_ratio_on_a_distilled_model_keeps_both_heads():
    build, size, heads = CASES["hf-deit-teacher"]
    res = otbr_hub.repair(build(), prune_ratio="auto", input_size=size, **FAST)
    assert res.report.prune_ratio in preset("default").grid()
    assert res.report.neurons_pruned >= 1 and not heads & set(res.report.pruned_per_layer)


def test_batchnorm_after_linear_is_attached_and_silenced_with_its_neuron():
    """LeViT's Linear + BatchNorm1d: a pruned row would otherwise still emit the norm's shift."""
    model = CASES["timm-levit"][0]()
    layers = select_layers(model, preset("default"))
    linear_bn = [l for l in layers if l.kind == "linear" and isinstance(l.norm, nn.BatchNorm1d)]
    assert linear_bn and all(l.norm.num_features == l.n_out for l in linear_bn)
    layer = linear_bn[0]
    rank = {l.name: torch.zeros(l.n_out, dtype=torch.float64) for l in layers}
    rank[layer.name][[1, 3]] = 1.0
    pruned = prune(model, layers, Scores(nwc=rank, rank=rank, ranking="global"), 2.5 / sum(l.n_out for l in layers))
    mods = dict(pruned.model.named_modules())
    assert pruned.pruned[layer.name] == [1, 3]
    assert (mods[layer.name].weight[[1, 3]] == 0).all()
    assert (mods[layer.norm_name].weight[[1, 3]] == 0).all() and (mods[layer.norm_name].bias[[1, 3]] == 0).all()


def test_transformers_model_without_image_size_round_trips_its_input_size(tmp_path):
    build = _hf("RegNetConfig", "RegNetForImageClassification", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                groups_width=4)
    res = otbr_hub.repair(build(), prune_ratio=0.05, input_size=S32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **FAST)
    out = save_model(res.source, res.model, tmp_path / "m")
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32} and processor["image_mean"] == [0.5] * 3
    back = load_folder(out)
    assert type(back.model) is type(res.model)
    assert (back.spec.height, back.spec.width, back.spec.mean, back.spec.std) == (32, 32, (0.5,) * 3, (0.25,) * 3)
    sd_a, sd_b = res.model.state_dict(), back.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_distilled_timm_model_round_trips(tmp_path):
    build, size, _ = CASES["timm-deit-distilled"]
    res = otbr_hub.repair(build(), prune_ratio=0.05, input_size=size, **FAST)
    back = load_folder(save_model(res.source, res.model, tmp_path / "m"))
    x = back.spec.normalize(torch.rand(2, *size))
    assert type(back.model) is type(res.model)
    assert torch.allclose(_logits(back.model, x), _logits(res.model, x), atol=1e-6)


# --------------------------------------------------------------------------- refused, in one line


class WeightNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3, padding=1))
        self.conv2 = nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 16, 3, padding=1))
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_computed_weights_are_not_scored_and_a_model_of_only_those_is_refused():
    """Zeroing a weight that weight norm recomputes every forward would change nothing."""
    model = WeightNormCNN().eval()
    with pytest.raises(UnsupportedModelError, match="no supported layer"):
        otbr_hub.repair(model, prune_ratio=0.05, input_size=S32, **FAST)
    assert [l.name for l in select_layers(model, preset("default", include_classifier=True))] == ["fc"]


def test_hidden_layer_as_wide_as_the_classes_is_not_taken_for_a_head():
    """A hidden Linear with the classifier's shape (width = number of classes) but no head-like
    name is an ordinary layer: it is scored, and only the last layer is the head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, CLASSES), nn.ReLU(), nn.Linear(CLASSES, CLASSES), nn.ReLU(),
                          nn.Linear(CLASSES, CLASSES)).eval()
    assert classifier_names(model) == ["5"]
    assert [l.name for l in select_layers(model, preset("default"))] == ["3"]  # "1" is the stem, skipped by default


def test_non_finite_logits_are_refused_in_one_line():
    """A model that answers NaN must not be scanned as 'clean' from meaningless margins."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, CLASSES)).eval()
    with torch.no_grad():
        model[3].bias[2] = float("nan")
    target = scan(model, settings=SCAN, input_size=(3, 8, 8)).targets[0]
    assert target.verdict == "skipped" and "non-finite logits" in target.skipped
    with pytest.raises(UnsupportedModelError, match="non-finite logits"):
        otbr_hub.repair(model, prune_ratio=0.05, input_size=(3, 8, 8), **FAST)


@pytest.mark.parametrize("classes", [2, 3])
def test_models_with_too_few_classes_for_the_tests_are_skipped_with_the_reason(classes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()
    target = scan(model, settings=SCAN, input_size=(3, 8, 8)).targets[0]
    assert target.verdict == "skipped" and "at least 4 classes" in target.skipped


def test_transformers_model_that_takes_no_pixel_values_is_refused_and_skipped():
    build = _hf("ImageGPTConfig", "ImageGPTForImageClassification", n_embd=16, n_layer=1, n_head=2, n_positions=64)
    model = build()
    with pytest.raises(UnsupportedModelError, match="pixel_values") as err:
        otbr_hub.repair(model, prune_ratio=0.05, input_size=(3, 8, 8), **FAST)
    assert "\n" not in str(err.value)
    target = scan(model, settings=SCAN, input_size=(3, 8, 8)).targets[0]
    assert target.verdict == "skipped" and "pixel_values" in target.skipped


def test_wrong_input_size_is_a_one_line_error():
    build, _, _ = CASES["timm-deit-distilled"]  # position embeddings fixed at 32 px
    with pytest.raises(UnsupportedModelError, match=r"forward pass fails on a 3x48x48 input.*input_size") as err:
        otbr_hub.repair(build(), prune_ratio=0.05, input_size=(3, 48, 48), **FAST)
    assert "\n" not in str(err.value)


def test_timm_class_built_without_create_model_cannot_be_saved_as_a_folder(tmp_path):
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    model = MlpMixer(num_classes=CLASSES, img_size=32, patch_size=8, num_blocks=2, embed_dim=32).eval()
    res = otbr_hub.repair(model, prune_ratio=0.05, input_size=S32, **FAST)
    assert type(res.model) is MlpMixer
    with pytest.raises(OtbrError, match="not built with timm.create_model"):
        save_model(res.source, res.model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_layers_torch_gets_wrong_in_channels_last_keep_contiguous_layouts() -> None:
    """torch 2.14's CPU channels-last kernels give a wrong weight gradient (or abort the process)
    for a 1x1 stride-2 convolution with 2-7 input channels, as in RepVGG's and MobileOne's stems."""
    from otbr_hub.load import uses_channels_last

    bad = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    assert not uses_channels_last(bad)
    assert uses_channels_last(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 1, stride=2)))


class _WithConv3d(nn.Module):
    """A 2-D CNN with a Conv3d inside (timm's lambda layers have one): Module.to refuses to
    make such a model channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Conv3d(1, 1, (3, 1, 1), padding=(1, 0, 0))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        x = self.mix(x.unsqueeze(1)).squeeze(1)
        return self.head(x.mean((2, 3)))


def test_a_model_with_a_conv3d_is_repaired() -> None:
    result = otbr_hub.repair(from_model(_WithConv3d().eval(), input_size=(3, 16, 16)), unlearn_steps=1, unlearn_batch=4,
                             verify_samples=4, prune_ratio=0.1, detector=False, device="cpu")
    assert result.report.verification["ok"]


def test_transformers_timm_wrapper_folders_are_transformers_models(tmp_path: Path) -> None:
    """TimmWrapperForImageClassification's config names a timm architecture *and* a model_type;
    its weights have transformers' names, so it is a transformers folder."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "TimmWrapperForImageClassification"):
        pytest.skip("this transformers has no TimmWrapper")
    from otbr_hub.load import load_folder

    cfg = transformers.TimmWrapperConfig(architecture="resnet18", num_labels=10,
                                         model_args=dict(layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8))
    torch.manual_seed(0)
    transformers.TimmWrapperForImageClassification(cfg).eval().save_pretrained(tmp_path / "tw")
    loaded = load_folder(tmp_path / "tw")
    assert loaded.library == "transformers"
    out = otbr_hub.repair(loaded, input_size=(3, 32, 32), unlearn_steps=1, unlearn_batch=4, verify_samples=4,
                          prune_ratio=0.05, detector=False, device="cpu").save(tmp_path / "out")
    again = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(again).__name__ == "TimmWrapperForImageClassification"


def test_models_that_need_more_than_images_are_refused_with_the_reason() -> None:
    """Siglip2 takes pre-patchified pixels with spatial_shapes: 'pass input_size' was false advice."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Siglip2ForImageClassification"):
        pytest.skip("this transformers has no Siglip2")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                  num_patches=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = transformers.Siglip2ForImageClassification(
        transformers.Siglip2Config(vision_config=vision, text_config=text, num_labels=10)).eval()
    with pytest.raises(UnsupportedModelError, match="needs more than a batch of images.*spatial_shapes"):
        otbr_hub.repair(from_model(model, input_size=(3, 32, 32)), detector=False, device="cpu")
