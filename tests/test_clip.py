"""Activation bounds (otbr_hub.clip): exact rewrite, saved and reloaded, refused where unsupported."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import otbr_hub
from otbr_hub.clip import bounds, clip_activations
from otbr_hub.errors import UsageError
from otbr_hub.load import forward_logits, from_model, load_folder
from otbr_hub.save import save_model
from otbr_hub.settings import preset
from tiny import tiny_vit

FAST = dict(unlearn_steps=2, unlearn_batch=8, verify_samples=16, device="cpu", detector=False)


def _resnet(name: str = "resnet18", **kw) -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=5, in_chans=1, **kw).eval()
    for bn in m.modules():  # trained-looking statistics, with spreads small enough that bounds bind
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(-1.0, 1.0)
                bn.bias.uniform_(-0.3, 0.3)
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    return m


def _hooked(model: nn.Module, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Independent reference: clamp the outputs of the BatchNorms that feed a ReLU inside a
    block (and the stem's when the first block projects it), found by name."""
    from timm.models.resnet import Bottleneck

    targets = []
    blocks = [b for s in (model.layer1, model.layer2, model.layer3, model.layer4) for b in s]
    for b in blocks:
        targets += [b.bn1] + ([b.bn2] if isinstance(b, Bottleneck) else [])
    if blocks[0].downsample is not None:
        targets.append(model.bn1)
    if isinstance(model.conv1, nn.Sequential):
        targets += [m for m in model.conv1 if isinstance(m, nn.BatchNorm2d)]
    hooks = [t.register_forward_hook(lambda mod, i, o, c=bounds(t, sigma).float().view(1, -1, 1, 1): torch.minimum(o, c))
             for t in targets]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name,kw", [("resnet18", {}), ("resnet50", {}), ("resnet50d", {}),
                                     ("resnet18", {"layers": [1, 1, 1, 1], "channels": (8, 16, 32, 64), "stem_width": 8})])
def test_the_rewrite_computes_the_bounded_model_and_the_bounds_bind(name, kw):
    model = _resnet(name, **kw)
    spec = from_model(model, input_size=(1, 48, 48)).spec
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = clip_activations(model, spec, 1.0)
    assert res.applied, res.reason
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    assert not any(type(m) is nn.ReLU for m in res.model.modules())
    x = spec.normalize(torch.rand(4, 1, 48, 48) * 3)
    with torch.no_grad():
        plain, got = model(x), res.model(x)
    ref = _hooked(model, x, 1.0)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    assert (plain - ref).abs().max() > 1e-2 * plain.abs().max()  # the bounds did bind on these inputs


def test_with_plain_relus_the_same_weights_give_the_unbounded_model():
    """Positive scaling commutes with ReLU: a user who drops the config entry gets the fused
    model, not a broken one."""
    model = _resnet()
    spec = from_model(model, input_size=(1, 48, 48)).spec
    res = clip_activations(model, spec, 3.0)
    plain = timm.create_model("resnet18", num_classes=5, in_chans=1).eval()
    plain.load_state_dict(res.model.state_dict())
    x = spec.normalize(torch.rand(3, 1, 48, 48))
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_never_positive_channels_are_silenced_not_blown_up():
    model = _resnet()
    with torch.no_grad():
        for bn in model.modules():  # every channel live to start with
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.0)
        model.layer1[0].bn1.weight[:3] = 0.0  # a pruned channel: no output at all
        model.layer1[0].bn1.bias[:3] = 0.0
        model.layer2[0].bn1.weight[0], model.layer2[0].bn1.bias[0] = 0.1, -1.0  # beta + 3|gamma| < 0
    spec = from_model(model, input_size=(1, 48, 48)).spec
    res = clip_activations(model, spec, 3.0)
    assert res.applied and res.silenced == 4
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("build,why", [
    (lambda: timm.create_model("seresnet18", num_classes=5), "squeeze-excite"),
    (lambda: timm.create_model("resnet18", num_classes=5, act_layer="silu"), "not a ReLU"),
    (lambda: timm.create_model("convnext_atto", num_classes=5), "timm and transformers ResNets only"),
    (tiny_vit, "timm and transformers ResNets only"),
])
def test_unsupported_models_are_left_as_they_are_with_the_reason(build, why):
    model = build().eval()
    spec = from_model(model).spec
    res = clip_activations(model, spec, 3.0)
    assert not res.applied and why in res.reason and res.model is model


def test_repair_records_the_bounds_and_saves_them_as_relu6(tmp_path):
    model = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8,
                              in_chans=1, num_classes=10).eval()
    res = otbr_hub.repair(model, prune_ratio=0.05, input_size=(1, 28, 28), **FAST)
    assert res.report.clipping["applied"] and res.report.clipping["sigma"] == 3.0
    assert type(res.model) is type(model) and type(res.model.layer1[0].act1) is nn.ReLU6
    assert type(model.layer1[0].act1) is nn.ReLU  # the input model is untouched
    out = save_model(res.source, res.model, tmp_path / "out")  # in-memory source: timm writes the config
    assert json.loads((out / "config.json").read_text())["model_args"]["act_layer"] == "relu6"
    back = load_folder(out)
    x = back.spec.normalize(torch.rand(3, 1, 28, 28))
    with torch.no_grad():
        assert torch.allclose(forward_logits(back.model.eval(), x), forward_logits(res.model.eval(), x), atol=1e-5)


def test_paper_preset_has_no_bounds_and_bad_sigma_is_a_usage_error():
    assert preset("paper").clip_sigma == 0.0
    res = otbr_hub.repair(_resnet(layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8), prune_ratio=0.05,
                          input_size=(1, 28, 28), clip_sigma=0, **FAST)
    assert not res.report.clipping["applied"] and res.report.clipping["reason"] == "--clip-sigma 0"
    assert not any(type(m) is nn.ReLU6 for m in res.model.modules())
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="clip-sigma"):
            preset(clip_sigma=bad)


def test_the_card_says_what_was_bounded_or_why_not():
    from otbr_hub.card import render_card

    model = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8,
                              in_chans=1, num_classes=10).eval()
    card = render_card(otbr_hub.repair(model, prune_ratio=0.05, input_size=(1, 28, 28), **FAST).report.to_dict())
    assert "**Activation bounds**: after fusion" in card and "beta + 3 |gamma|" in card and "act_layer: relu6" in card
    card = render_card(otbr_hub.repair(tiny_vit(), prune_ratio=0.05, **FAST).report.to_dict())
    assert "**Activation bounds**: not applied (activation bounds are implemented for timm and transformers ResNets only" in card


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_transformers_resnet_gets_the_stem_bound_and_saves_it_as_hidden_act_relu6(tmp_path, layer_type):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[16, 24], depths=[1, 2], layer_type=layer_type, num_labels=3,
                       num_channels=1)
    model = ResNetForImageClassification(cfg).eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(-1.0, 1.0)
                bn.bias.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 1.5)
    spec = from_model(model, input_size=(1, 32, 32)).spec
    res = clip_activations(model, spec, 1.0)
    assert res.applied, res.reason
    assert res.norms == ["resnet.embedder.embedder.normalization"]  # the stem only
    assert model.config.hidden_act == "relu" and res.model.config.hidden_act == "relu6"
    x = spec.normalize(torch.rand(4, 1, 32, 32) * 3)
    stem = model.resnet.embedder.embedder.normalization
    c = bounds(stem, 1.0).float().view(1, -1, 1, 1)
    hook = stem.register_forward_hook(lambda m, i, o: torch.where(c == 0, torch.zeros_like(o), torch.minimum(o, c)))
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    hook.remove()
    with torch.no_grad():
        got, plain = res.model(pixel_values=x).logits, model(pixel_values=x).logits
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-3 * plain.abs().max()  # the bound binds on these inputs

    repaired = otbr_hub.repair(model, prune_ratio=0.05, input_size=(1, 32, 32), **FAST)
    assert repaired.report.clipping["applied"] and repaired.model.config.hidden_act == "relu6"
    assert model.config.hidden_act == "relu"
    from otbr_hub.card import render_card

    assert "`hidden_act: relu6` in `config.json`" in render_card(repaired.report.to_dict())
    out = save_model(repaired.source, repaired.model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "relu6"
    back = load_folder(out)
    with torch.no_grad():
        assert torch.allclose(forward_logits(back.model.eval(), x), forward_logits(repaired.model.eval(), x), atol=1e-5)


def test_transformers_resnet_with_an_identity_first_block_is_left_unbounded():
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_labels=3, num_channels=1)).eval()
    res = clip_activations(model, from_model(model, input_size=(1, 32, 32)).spec, 3.0)
    assert not res.applied and "identity shortcut" in res.reason and res.model is model


def test_a_binding_residual_stream_is_caught_and_the_model_left_unbounded(monkeypatch):
    import otbr_hub.clip as clip

    model = _resnet()
    spec = from_model(model, input_size=(1, 48, 48)).spec
    monkeypatch.setattr(clip, "_STREAM_HEADROOM", 1e-3)  # streams would clip almost everything
    res = clip_activations(model, spec, 3.0, inputs=torch.rand(4, 1, 48, 48))
    assert not res.applied and "did not match its reference" in res.reason and res.model is model


def test_relu6_models_the_stage_never_touched_are_saved_with_their_own_config(tmp_path):
    """MobileNetV2 is ReLU6 by design: saving it must not add the bounds' config entry."""
    model = timm.create_model("mobilenetv2_050", num_classes=4).eval()
    out = save_model(from_model(model, input_size=(3, 32, 32)), model, tmp_path / "m")
    assert "act_layer" not in (json.loads((out / "config.json").read_text()).get("model_args") or {})
    assert type(load_folder(out).model) is type(model)


def test_the_check_runs_without_tf32_and_puts_the_flags_back():
    from otbr_hub.clip import _exact_float32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    with _exact_float32():
        assert not cudnn.allow_tf32 and not matmul.allow_tf32
    assert (cudnn.allow_tf32, matmul.allow_tf32) == before
