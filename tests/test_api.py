"""The Python API as a user meets it: saving a result, refusing bad arguments with one-line
UsageErrors that name the field and its flag, and leaving the caller's state alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import otbr_hub
from otbr_hub.detect import DetectSettings
from otbr_hub.errors import UnsupportedModelError, UsageError
from otbr_hub.load import check_forward, forward_logits, from_model, load_folder
from otbr_hub.settings import RepairSettings, preset
from otbr_hub.save import save_model
from tiny import timm_folder, tiny_timm

FAST = dict(unlearn_steps=2, unlearn_batch=16, verify_samples=32, device="cpu", detector=False)
MNIST = dict(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,))


class Plain(nn.Module):
    """A plain torch classifier (no timm/transformers config)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _plain() -> Plain:
    torch.manual_seed(0)
    return Plain().eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return forward_logits(model.eval(), x)


@pytest.fixture(scope="module")
def repaired_timm() -> otbr_hub.RepairResult:
    """A repaired tiny timm ResNet with activation bounds (its ReLUs became ReLU6)."""
    res = otbr_hub.repair(tiny_timm(), prune_ratio=0.05, **MNIST, **FAST)
    assert res.report.clipping["applied"] and res.report.clipping["config"] == {"act_layer": "relu6"}
    return res


# --------------------------------------------------------------------------- RepairResult.save


def test_save_writes_what_the_cli_writes_and_reloads_with_the_bounds(repaired_timm, tmp_path, monkeypatch):
    res = repaired_timm
    out = res.save(tmp_path / "fixed")
    assert out == (tmp_path / "fixed").absolute()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "otbr_report.json"]
    assert json.loads((out / "config.json").read_text())["model_args"]["act_layer"] == "relu6"
    assert json.loads((out / "otbr_report.json").read_text())["prune_ratio"] == 0.05
    assert "# fixed" in (out / "README.md").read_text()

    x = torch.randn(4, 1, 28, 28) * 100  # large inputs: a ReLU where a ReLU6 belongs would show
    expected = _logits(res.model, x)
    monkeypatch.chdir(tmp_path)
    via_timm = timm.create_model("local-dir:fixed", pretrained=True)
    assert torch.equal(_logits(via_timm, x), expected)
    assert torch.equal(_logits(load_folder(out).model, x), expected)

    # the check has teeth: the same weights without the ReLU6s answer differently
    relu = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, in_chans=1,
                             num_classes=10)
    relu.load_state_dict(via_timm.state_dict())
    assert not torch.allclose(_logits(relu, x), expected)


def test_timm_save_for_hf_keeps_the_bounds_with_the_report_config(repaired_timm, tmp_path, monkeypatch):
    """What the README tells timm users who save with timm's own helper."""
    from timm.models import save_for_hf

    res = repaired_timm
    save_for_hf(res.model, str(tmp_path / "hf"), model_args=res.report.clipping.get("config"), safe_serialization=True)
    monkeypatch.chdir(tmp_path)
    x = torch.randn(4, 1, 28, 28) * 100
    assert torch.equal(_logits(timm.create_model("local-dir:hf", pretrained=True), x), _logits(res.model, x))


def test_save_refuses_a_non_empty_folder_unless_overwrite_and_never_the_source(repaired_timm, tmp_path):
    out = repaired_timm.save(tmp_path / "o")
    with pytest.raises(UsageError, match="not empty"):
        repaired_timm.save(out)
    assert repaired_timm.save(out, overwrite=True) == out
    src = timm_folder(tmp_path / "src")
    res = otbr_hub.repair(src, prune_ratio=0.05, **FAST)
    with pytest.raises(UsageError, match="holds the source model"):
        res.save(src, overwrite=True)
    assert (res.save(tmp_path / "from-folder") / "config.json").is_file()


def test_a_transformers_model_repaired_at_another_size_reloads_at_that_size(tmp_path):
    """SwiftFormer's config says image_size 224 but any size runs: repaired at 32 px, the saved
    config must say 32 so the folder reloads (and is scanned) at the size it was repaired at;
    a ViT's image_size is a shape, so it is left alone there."""
    import transformers

    torch.manual_seed(0)
    model = transformers.SwiftFormerForImageClassification(transformers.SwiftFormerConfig(
        num_labels=5, depths=[1, 1, 1, 1], embed_dims=[8, 16, 32, 48])).eval()
    assert model.config.image_size == 224
    res = otbr_hub.repair(model, prune_ratio=0.05, input_size=(3, 32, 32), **FAST)
    back = load_folder(res.save(tmp_path / "swift"))
    assert (back.spec.height, back.spec.width) == (32, 32)
    assert model.config.image_size == 224  # the caller's model keeps its config
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_logits(back.model, x), _logits(res.model, x), atol=1e-5)

    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5)).eval()
    saved = otbr_hub.repair(vit, prune_ratio=0.05, **FAST).save(tmp_path / "vit")
    assert json.loads((saved / "config.json").read_text())["image_size"] == 32


def test_save_of_a_plain_torch_model_is_refused(tmp_path):
    res = otbr_hub.repair(_plain(), prune_ratio=0.2, input_size=(3, 16, 16), **FAST)
    with pytest.raises(UnsupportedModelError, match="plain torch Plain .*state_dict"):
        res.save(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- models that cannot be repaired


def test_a_model_on_the_meta_device_is_refused_by_repair_and_skipped_by_scan():
    with torch.device("meta"):
        model = Plain()
    with pytest.raises(UnsupportedModelError, match="'meta' device"):
        otbr_hub.repair(model, input_size=(3, 16, 16), **FAST)
    with pytest.raises(UnsupportedModelError, match="'meta' device"):
        from_model(model, input_size=(3, 16, 16))
    target = otbr_hub.scan(model, input_size=(3, 16, 16)).targets[0]
    assert target.verdict == "skipped" and "'meta' device" in target.skipped


@pytest.mark.parametrize("size", [(32, 32), (3, 0, 32), (3, 32, 32, 1), (3, -1, 32), (3, 32.0, 32), (True, 32, 32),
                                  "3x32x32", 32])
def test_input_size_must_be_three_positive_ints(size):
    with pytest.raises(UsageError, match=r"input_size must be \(C, H, W\) with positive integers, got"):
        otbr_hub.repair(_plain(), input_size=size, **FAST)


def test_input_size_accepts_lists_and_numpy_ints():
    import numpy as np

    assert from_model(_plain(), input_size=[3, 16, 16]).spec.height == 16
    assert from_model(_plain(), input_size=tuple(np.array([3, 16, 12]))).spec.width == 12


def test_an_in_memory_timm_feature_extractor_is_named_as_such():
    torch.manual_seed(0)
    features = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, in_chans=1,
                                 num_classes=0).eval()
    why = "a timm feature extractor \\(num_classes is 0\\), not a classifier"
    with pytest.raises(UnsupportedModelError, match=why):
        otbr_hub.repair(features, input_size=(1, 28, 28), **FAST)
    with pytest.raises(UnsupportedModelError, match=why):
        check_forward(features, from_model(features, input_size=(1, 28, 28)).spec)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kw,message", [
    (dict(unlearn_steps="3"), "unlearn_steps (--unlearn-steps) must be an integer, got '3' (str)"),
    (dict(lam="0.5"), "lam (--lambda) must be a number, got '0.5' (str)"),
    (dict(unlearn_steps=2.5), "unlearn_steps (--unlearn-steps) must be an integer, got 2.5"),
    (dict(seed="x"), "seed (--seed) must be an integer"),
    (dict(seed=1.5), "seed (--seed) must be an integer"),
    (dict(seed=True), "seed (--seed) must be an integer, got True (bool)"),
    (dict(verify_samples=2.5), "verify_samples (--verify-samples) must be an integer"),
    (dict(unlearn_chunk=1.5), "unlearn_chunk (--unlearn-chunk) must be an integer or None"),
    (dict(unlearn_lr=float("nan")), "unlearn_lr (--unlearn-lr) must be a finite number"),
    (dict(layer_cap=float("inf")), "layer_cap (--layer-cap) must be a finite number"),
    (dict(normalize_noise="no"), "normalize_noise (--normalize-noise) must be True or False"),
    (dict(layer_types=5), "layer_types (--layer-types) must be a string"),
    (dict(prune_ratio=True), "prune_ratio (--prune-ratio) must be a number in (0, 1) or 'auto'"),
    (dict(device="cuda:abc"), "device (--device) must be auto, cpu, cuda or cuda:N, got 'cuda:abc'"),
    (dict(device="gpu"), "device (--device) must be auto, cpu, cuda or cuda:N"),
    (dict(device=0), "device (--device) must be a string"),
    (dict(lam=2), "lam (--lambda) must be in [0, 1], got 2"),
    (dict(prune_ratio=1.5), "prune_ratio (--prune-ratio) must be in (0, 1), got 1.5"),
    (dict(unlearn_batch=0), "unlearn_batch (--unlearn-batch) must be >= 1, got 0"),
    (dict(unlearn_steps=-1), "unlearn_steps (--unlearn-steps) must be >= 1, got -1"),
    (dict(unlearn_steps=0), "unlearn_steps (--unlearn-steps) must be >= 1, got 0"),
    (dict(min_agreement=2), "min_agreement (--min-agreement) must be in [0, 1], got 2"),
    (dict(ratio_grid="a,b"), "ratio_grid (--ratio-grid) must be a comma list of numbers"),
])
def test_bad_settings_name_the_field_and_its_flag(kw, message):
    with pytest.raises(UsageError) as err:
        preset(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError) as direct:  # a RepairSettings made by hand is checked the same way
        RepairSettings(**kw).validate()
    assert message in str(direct.value)


def test_good_settings_pass_and_numpy_scalars_become_plain_numbers():
    import numpy as np

    s = preset(seed=np.int64(3), lam=np.float32(0.25), unlearn_steps=np.int64(1), prune_ratio="0.1", device="cuda:1")
    assert type(s.seed) is int and type(s.lam) is float and type(s.unlearn_steps) is int and s.prune_ratio == 0.1 and s.device == "cuda:1"
    assert preset(lam=1).lam == 1 and preset("paper").to_dict() == preset("paper").to_dict()
    with pytest.raises(UsageError, match="unknown preset"):
        preset(["paper"])  # not hashable: still a UsageError, not a TypeError


def test_usage_errors_are_value_errors():
    with pytest.raises(ValueError):
        preset(lam=2)
    assert issubclass(UsageError, otbr_hub.OtbrError) and issubclass(UsageError, ValueError)


@pytest.mark.parametrize("kw,message", [
    (dict(steps=0), "inputs and steps must be at least 1"),
    (dict(margin_scale="x"), "margin_scale must be 'sd' or 'mad'"),
    (dict(device="cuda:abc"), "DetectSettings.device must be None (where the model is), cpu, cuda or cuda:N, got 'cuda:abc'"),
    (dict(device="auto"), "DetectSettings.device must be"),
])
def test_detect_settings_raise_usage_errors(kw, message):
    with pytest.raises(UsageError) as err:
        DetectSettings(**kw)
    assert message in str(err.value)
    assert DetectSettings(device="cuda:0").device == "cuda:0" and DetectSettings().device is None


def test_settings_object_and_preset_keyword_together_are_refused():
    with pytest.raises(UsageError, match="pass preset= or a RepairSettings, not both"):
        otbr_hub.repair(_plain(), RepairSettings(prune_ratio=0.05), preset="paper", input_size=(3, 16, 16))


@pytest.mark.parametrize("settings", [{"prune_ratio": 0.05}, "paper", 0.05])
def test_settings_of_the_wrong_type_are_refused(settings):
    with pytest.raises(UsageError, match="settings must be a RepairSettings, got .*; pass fields as keywords"):
        otbr_hub.repair(_plain(), settings, input_size=(3, 16, 16))


def test_a_settings_object_with_keyword_overrides_still_works():
    res = otbr_hub.repair(_plain(), preset(prune_ratio=0.3), input_size=(3, 16, 16), **{**FAST, "prune_ratio": 0.2})
    assert res.report.prune_ratio == 0.2 and res.report.settings["unlearn_steps"] == 2


# --------------------------------------------------------------------------- the caller's state


def test_repair_is_seeded_but_leaves_the_callers_random_stream_alone():
    model = _plain()  # seeds the RNG itself: build it first
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    first = otbr_hub.repair(model, prune_ratio=0.2, input_size=(3, 16, 16), seed=7, **FAST)
    assert torch.equal(torch.rand(5), expected)  # not reset to seed 7, nor advanced by the repair
    again = otbr_hub.repair(_plain(), prune_ratio=0.2, input_size=(3, 16, 16), seed=7, **FAST)
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_forward_hooks_run_during_repair_and_travel_with_the_result():
    """As the repair docstring says: hooks are part of the model (weight_norm, prune), so they stay."""
    model = _plain()
    seen: list[int] = []
    model.fc.register_forward_hook(lambda mod, inputs, out: seen.append(out.shape[0]))
    res = otbr_hub.repair(model, prune_ratio=0.2, input_size=(3, 16, 16), **FAST)
    assert seen  # the synthetic inputs went through the user's hook
    seen.clear()
    _logits(res.model, torch.zeros(2, 3, 16, 16))
    assert seen == [2] and len(model.fc._forward_hooks) == 1


def test_weight_norm_models_are_repaired_through_their_hooks():
    """The reason hooks are not detached: an old-style weight_norm computes ``weight`` in a pre-hook
    (here on the stem, which is not pruned, so its weights must come through the hook)."""
    model = _plain()
    torch.nn.utils.weight_norm(model.conv1)
    x = torch.randn(3, 3, 16, 16)
    before = _logits(model, x)
    res = otbr_hub.repair(model, prune_ratio=0.2, input_size=(3, 16, 16), lam=0.0, **FAST)
    assert torch.allclose(_logits(res.model, x), before, atol=1e-5)  # lambda 0: the original back


def test_scan_takes_detect_settings_directly_and_refuses_other_types():
    model = tiny_timm()
    quick = DetectSettings(steps=5, inputs_per_class=2, device="cpu")
    report = otbr_hub.scan(model, settings=quick, **MNIST)
    assert report.targets[0].verdict in ("clean", "suspicious", "backdoored")
    assert report.settings["detector"]["steps"] == 5
    with pytest.raises(UsageError, match="ScanSettings"):
        otbr_hub.scan(model, settings={"steps": 5})
    with pytest.raises(UsageError, match="type int"):
        otbr_hub.scan(42)


def test_scan_inside_no_grad_with_a_frozen_model_gives_the_same_answer():
    """Inference code often runs under ``torch.no_grad()`` with frozen weights; the margin
    search optimises its inputs, so it must get gradients anyway, and answer the same."""
    quick = DetectSettings(steps=5, inputs_per_class=2, device="cpu")
    plain = otbr_hub.scan(tiny_timm(), settings=quick, **MNIST).targets[0]
    model = tiny_timm().requires_grad_(False)
    with torch.no_grad():
        frozen = otbr_hub.scan(model, settings=quick, **MNIST).targets[0]
    assert frozen.error is None and frozen.verdict == plain.verdict
    assert frozen.backdoor.p_value == plain.backdoor.p_value
    assert not any(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- models users really have


def test_inference_mode_callers_and_models_built_under_it():
    """``torch.inference_mode()`` around the call, or weights created under it (inference
    tensors cannot take part in autograd), must not break unlearning or the margin search."""
    quick = DetectSettings(steps=5, inputs_per_class=2, device="cpu")
    model = tiny_timm()
    with torch.inference_mode():
        res = otbr_hub.repair(model, prune_ratio=0.05, **FAST, **MNIST)
        target = otbr_hub.scan(model, settings=quick, **MNIST).targets[0]
    assert res.report.neurons_pruned > 0 and target.error is None and target.verdict != "error"
    with torch.inference_mode():
        built = tiny_timm()
    res = otbr_hub.repair(built, prune_ratio=0.05, **FAST, **MNIST)
    assert not any(p.is_inference() for p in res.model.parameters())
    assert otbr_hub.scan(built, settings=quick, **MNIST).targets[0].error is None


def test_bad_normalisation_and_argument_types_are_usage_errors():
    for kw, words in ((dict(mean="0.5"), "one number per input channel"), (dict(mean=("a",)), "one number per"),
                      (dict(std=(0.0,)), "std must be positive"), (dict(mean=float("nan")), "finite")):
        with pytest.raises(UsageError, match=words):
            otbr_hub.repair(tiny_timm(), prune_ratio=0.05, input_size=(1, 28, 28), **kw, **FAST)
    with pytest.raises(UsageError, match="progress must be a callable"):
        otbr_hub.repair(tiny_timm(), prune_ratio=0.05, progress=5, **MNIST, **FAST)
    # False passes the check as "no display": it must mean that, not fail later
    assert otbr_hub.repair(tiny_timm(), prune_ratio=0.05, progress=False, **MNIST, **FAST).report.neurons_pruned > 0
    with pytest.raises(UsageError, match="lr must be a positive number"):
        DetectSettings(lr=-1)
    with pytest.raises(UsageError, match="seed must be an integer"):
        DetectSettings(seed="x")


def test_an_integer_parameter_does_not_decide_the_input_dtype():
    model = tiny_timm()
    model.ids = nn.Parameter(torch.arange(4), requires_grad=False)  # a lookup table, say
    assert otbr_hub.repair(model, prune_ratio=0.05, **MNIST, **FAST).report.neurons_pruned > 0


def test_one_class_is_refused_and_three_are_repaired_without_a_scan():
    one = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4), nn.ReLU(),
                        nn.Linear(4, 1))
    with pytest.raises(UnsupportedModelError, match="at least two classes"):
        otbr_hub.repair(one, prune_ratio=0.05, **MNIST, **FAST)
    three = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), in_chans=1, num_classes=3)
    res = otbr_hub.repair(three.eval(), **MNIST, **{**FAST, "detector": None})
    assert "cannot test for a backdoor" in res.report.ratio_reason and res.report.scan_before is None


def test_publication_mistakes_fail_before_the_repair():
    """push=True on a plain torch model, or a pull request for an in-memory model, cannot work:
    that is known before any unlearning, so no time is spent on it."""
    calls = []
    progress = lambda stage, *a: calls.append(stage)  # noqa: E731
    with pytest.raises(UnsupportedModelError, match="only timm and transformers"):
        otbr_hub.repair(_plain(), prune_ratio=0.05, push=True, progress=progress, input_size=(3, 16, 16), **FAST)
    with pytest.raises(UsageError, match="needs a model loaded from the Hub"):
        otbr_hub.repair(tiny_timm(), prune_ratio=0.05, pr=True, progress=progress, **MNIST, **FAST)
    assert "unlearn" not in calls
    res = otbr_hub.repair(tiny_timm(), prune_ratio=0.05, **MNIST, **FAST)
    for kw, words in ((dict(repo_id=123), "repo_id must be"), (dict(repo_id=""), "repo_id must be"),
                      (dict(token=123), "token must be")):
        with pytest.raises(UsageError, match=words):
            otbr_hub.push_to_hub(res, **kw)
    with pytest.raises(UsageError, match="RepairResult"):
        otbr_hub.push_to_hub(tiny_timm())


def test_saved_folders_reload_as_the_repaired_model(tmp_path):
    """Weights computed by a parametrization are saved as plain weights (the rebuilt layers
    know only ``weight``), a head swapped after create_model is rebuilt at its width, a
    compiled model is saved as the module it compiled, and a folder whose weights do not
    match its config is refused instead of loading with random weights."""
    from safetensors.torch import load_file, save_file

    from tiny import tiny_vit

    vit = tiny_vit()
    torch.nn.utils.parametrizations.weight_norm(vit.vit.layers[0].mlp.fc1)
    x = torch.rand(2, 3, 32, 32)
    swapped = tiny_timm()
    swapped.fc = nn.Linear(64, 5)
    cases = [(vit, {}, lambda m: m(pixel_values=x).logits),
             (swapped.eval(), dict(num_classes=5, **MNIST), lambda m: m(x[:, :1, :28, :28])),
             (torch.compile(tiny_timm()), MNIST, lambda m: m(x[:, :1, :28, :28]))]
    for i, (model, kw, run) in enumerate(cases):
        res = otbr_hub.repair(from_model(model, **kw), prune_ratio=0.05, **FAST)
        back = load_folder(res.save(tmp_path / f"m{i}"))
        with torch.no_grad():
            assert torch.allclose(run(back.model), run(res.model), atol=1e-5), i
    assert type(vit.vit.layers[0].mlp.fc1).__name__.startswith("Parametrized")  # input untouched
    folder = tmp_path / "m0"
    weights = load_file(folder / "model.safetensors")
    del weights["classifier.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="missing classifier.weight"):
        load_folder(folder)


def test_hooks_on_bounded_activations_survive_the_repair():
    model = tiny_timm()
    seen = []
    model.layer1[0].act2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    res = otbr_hub.repair(model, prune_ratio=0.05, **MNIST, **FAST)
    assert type(res.model.layer1[0].act2) is nn.ReLU6  # the activation bounds applied here
    seen.clear()
    with torch.no_grad():
        res.model(torch.rand(1, 1, 28, 28))
    assert len(seen) == 1


def test_a_folder_without_batchnorm_step_counters_still_loads(tmp_path):
    """Missing ``num_batches_tracked`` buffers change nothing in eval mode; only missing
    weights make a transformers folder a different model."""
    from safetensors.torch import load_file, save_file
    from transformers import ResNetConfig, ResNetForImageClassification

    from otbr_hub.save import save_model

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      layer_type="basic", num_labels=10, image_size=32)).eval()
    folder = save_model(from_model(model), model, tmp_path / "r")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    assert load_folder(folder).library == "transformers"


def test_a_parametrized_model_passes_the_publish_check(tmp_path):
    from otbr_hub.push import verify_saved

    from tiny import tiny_vit

    vit = tiny_vit()
    torch.nn.utils.parametrizations.weight_norm(vit.classifier)
    res = otbr_hub.repair(vit, prune_ratio=0.05, **FAST)
    assert verify_saved(res, res.save(tmp_path / "v"), samples=8)["ok"]


def test_a_stray_rank_variable_without_a_launch_still_reads_standard_input(monkeypatch):
    import io

    from otbr_hub.scan_cli import _read_target_file

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("models/a\n"))
    assert _read_target_file("-") == ["models/a"]


def test_detect_settings_take_numpy_numbers():
    import numpy as np

    assert DetectSettings(seed=np.int64(3), lr=np.float32(0.05)).seed == 3


def test_a_target_list_keeps_a_hash_inside_a_name_and_drops_comments(tmp_path):
    from otbr_hub.errors import UsageError
    from otbr_hub.scan_cli import _read_target_file

    listed = tmp_path / "models.txt"
    listed.write_text("# the first line is a comment\nmodels/run#2\nuser/model@v1  # pinned\n\n   # indented comment\n")
    assert _read_target_file(str(listed)) == ["models/run#2", "user/model@v1"]
    listed.write_bytes(b"\xff\xfe models")
    with pytest.raises(UsageError, match="not a UTF-8 text file"):
        _read_target_file(str(listed))


def test_malformed_configs_are_refused_with_what_is_wrong(tmp_path):
    """Wrong types in a timm config.json, and a transformers config whose shapes do not fit
    its weights, are one-line UnsupportedModelErrors, not a TypeError from deep inside."""
    import shutil

    from tiny import tiny_vit

    example = Path(__file__).resolve().parents[1] / "examples" / "badnets-resnet"
    for i, (key, value, why) in enumerate([
        ("model_args", [1, 2], "'model_args' must be an object"),
        ("pretrained_cfg", [1], "'pretrained_cfg' must be an object"),
        ("architecture", 5, "'architecture' must be a timm model name"),
        ("input_size", [32, 32], r"pretrained_cfg\.input_size must be \(C, H, W\)"),
        ("input_size", [1, -32, 32], r"pretrained_cfg\.input_size must be \(C, H, W\)"),
    ]):
        folder = shutil.copytree(example, tmp_path / f"timm{i}")
        cfg = json.loads((folder / "config.json").read_text())
        (cfg["pretrained_cfg"] if key == "input_size" else cfg)[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedModelError, match=why):
            load_folder(folder)
    vit = tiny_vit()
    vit.save_pretrained(tmp_path / "vit")
    cfg = json.loads((tmp_path / "vit" / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "a", "1": "b"}, {"a": 0, "b": 1}
    (tmp_path / "vit" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="the weights do not match config.json"):
        load_folder(tmp_path / "vit")


def test_review_fixes_of_the_python_api(tmp_path):
    """A repair under inference_mode gives trainable tensors; the new ReLU6s keep each module's
    train/eval flag; a head swapped after create_model is taken at its own width; a custom
    detector's bad answer is a UsageError; scan keeps the order of its targets; the card of an
    in-memory model says so instead of naming a folder '<in-memory>'."""
    from otbr_hub import DetectSettings

    model = tiny_timm()
    model.train()
    model.layer2.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    with torch.inference_mode():
        res = otbr_hub.repair(model, prune_ratio=0.05, **MNIST, **FAST)
    assert not any(p.is_inference() for p in res.model.parameters())
    assert {n: m.training for n, m in res.model.named_modules()} == flags
    res.model(torch.rand(2, 1, 28, 28)).sum().backward()  # trainable
    assert "given to `otbr_hub.repair`" in (res.save(tmp_path / "mem") / "README.md").read_text()

    swapped = tiny_timm()
    swapped.fc = nn.Linear(64, 5)
    assert otbr_hub.repair(swapped, prune_ratio=0.05, **MNIST, **FAST).report.input["num_classes"] == 5

    checks = {**FAST, "detector": lambda m: "yes"}
    with pytest.raises(UsageError, match=r"detector must return \(flagged: bool, p_value"):
        otbr_hub.repair(tiny_timm(), **MNIST, **checks)
    with pytest.raises(UsageError, match="steps must be an integer"):
        DetectSettings(steps="x")

    folder = timm_folder(tmp_path / "folder")
    cheap = DetectSettings(inputs_per_class=1, steps=2, weight_evidence=False)
    report = otbr_hub.scan(str(folder), from_model(tiny_timm(), **MNIST), settings=cheap)
    assert [t.target for t in report.targets][0] == str(folder) and report.targets[1].target.startswith("<in-memory")


def test_saving_keeps_each_tensors_dtype_and_tied_weights_reload_with_timm(tmp_path: Path) -> None:
    """A half-precision checkpoint that keeps BatchNorm in fp32 is written back the same way
    (fp16 would turn a running variance of 1e5 into inf), and a weight tied under two names is
    written under both, so timm itself can load the folder."""
    from safetensors.torch import load_file, save_file

    model = tiny_timm().half()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.float()
    with torch.no_grad():
        model.bn1.running_var.fill_(1e5)
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "config.json").write_text((timm_folder(tmp_path / "plain") / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors", metadata={"format": "pt"})
    out = otbr_hub.repair(str(src), prune_ratio=0.05, **FAST).save(tmp_path / "mixed-out")
    saved = load_file(out / "model.safetensors")
    assert saved["conv1.weight"].dtype == torch.float16 and saved["bn1.running_var"].dtype == torch.float32
    assert torch.isfinite(saved["bn1.running_var"]).all()
    assert load_folder(out).dtype == torch.float16

    torch.manual_seed(0)
    tied = timm.create_model("resnet18", layers=[2, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, in_chans=1,
                             num_classes=10).eval()
    tied.layer1[1].conv2.weight = tied.layer1[1].conv1.weight
    out = otbr_hub.repair(from_model(tied, input_size=(1, 28, 28)), prune_ratio=0.05, **FAST).save(tmp_path / "tied-out")
    assert {"layer1.1.conv1.weight", "layer1.1.conv2.weight"} <= load_file(out / "model.safetensors").keys()
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert set(reloaded.state_dict()) == set(tied.state_dict())


def test_timm_training_checkpoints_load_as_timm_reads_them(tmp_path: Path) -> None:
    """A .bin holding {"state_dict": ..., "epoch": ...} with DDP's ``module.`` prefixes loads
    (timm unwraps both); one that holds more than tensors is a one-line refusal."""
    model = tiny_timm()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((timm_folder(tmp_path / "plain") / "config.json").read_text())
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, folder / "pytorch_model.bin")
    loaded = load_folder(folder)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({**model.state_dict(), "epoch": 3}, folder / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="holds more than weights"):
        load_folder(folder)


def test_input_size_and_normalisation_given_to_repair_apply_to_folders(tmp_path: Path) -> None:
    folder = timm_folder(tmp_path / "m")
    report = otbr_hub.repair(str(folder), input_size=(1, 36, 36), mean=(0.5,), std=(0.25,), prune_ratio=0.05, **FAST).report
    assert (report.input["height"], report.input["width"], report.input["mean"], report.input["std"]) == (36, 36, [0.5], [0.25])
    assert otbr_hub.repair(str(folder), prune_ratio=0.05, **FAST).report.input["mean"] == [pytest.approx(0.286)]


def test_a_transformers_model_with_a_swapped_head_saves_a_loadable_config(tmp_path: Path) -> None:
    from transformers import AutoModelForImageClassification
    from tiny import tiny_vit

    model = tiny_vit()
    model.classifier = nn.Linear(model.classifier.in_features, 3)
    out = otbr_hub.repair(from_model(model, num_classes=3), prune_ratio=0.05, **FAST).save(tmp_path / "out")
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 3 and load_folder(out).spec.num_classes == 3


def test_a_model_its_config_cannot_rebuild_is_refused_at_save(tmp_path: Path) -> None:
    model = tiny_timm()
    model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(model.fc.in_features, 3))
    result = otbr_hub.repair(from_model(model.eval(), input_size=(1, 28, 28), num_classes=3), prune_ratio=0.05, **FAST)
    with pytest.raises(otbr_hub.OtbrError, match="would not rebuild this model from its config"):
        result.save(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_transformers_folder_without_an_image_processor_gets_one(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor
    from tiny import tiny_vit

    model = tiny_vit()
    model.save_pretrained(tmp_path / "src")  # weights and config only
    out = otbr_hub.repair(str(tmp_path / "src"), prune_ratio=0.05, **FAST).save(tmp_path / "out")
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor(images=[np.zeros((32, 32, 3), np.uint8)], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_an_in_memory_timm_model_saves_the_input_it_was_repaired_for(tmp_path: Path) -> None:
    """timm's export records the input size, mean and std as preprocessing, and drops the
    architecture's default test size (resnet18: 288 px), which would not apply to a 28 px model."""
    model = tiny_timm()
    out = otbr_hub.repair(from_model(model, input_size=(1, 28, 28), mean=(0.3,), std=(0.4,)), prune_ratio=0.05,
                          **FAST).save(tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [1, 28, 28] and cfg["mean"] == [0.3] and cfg["std"] == [0.4]
    assert not cfg.get("test_input_size")


def test_a_timm_model_built_with_python_objects_says_how_to_save_it(tmp_path: Path) -> None:
    model = timm.create_model("resnet18", act_layer=nn.SiLU, num_classes=10, in_chans=1, layers=[1, 1, 1, 1],
                              channels=(8, 16, 32, 64), stem_width=8).eval()
    result = otbr_hub.repair(from_model(model, input_size=(1, 28, 28)), prune_ratio=0.05, **FAST)
    with pytest.raises(otbr_hub.OtbrError, match="act_layer='silu'"):
        result.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_in_memory_transformers_model_keeps_its_mixed_dtypes_on_save(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from tiny import tiny_vit

    model = tiny_vit().half()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    out = otbr_hub.repair(from_model(model), prune_ratio=0.05, **FAST).save(tmp_path / "out")
    saved = load_file(out / "model.safetensors")
    norms = [k for k in saved if "layernorm" in k]
    assert norms and all(saved[k].dtype == torch.float32 for k in norms)
    assert saved["classifier.weight"].dtype == torch.float16


@pytest.mark.parametrize("library", ["transformers", "timm"])
def test_weights_that_overflow_the_source_dtype_are_not_saved(tmp_path: Path, library: str) -> None:
    """A float16 folder is repaired in float32; weights that left float16's range on the way
    are refused on save (both save paths) instead of being written as infinities."""
    from tiny import tiny_vit

    if library == "transformers":
        half = tiny_vit().half()
        src = save_model(from_model(half), half, tmp_path / "src")
    else:
        src = timm_folder(tmp_path / "src", dtype=torch.float16)
    result = otbr_hub.repair(str(src), prune_ratio=0.05, **FAST)
    weight = next(p for n, p in result.model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert weight.dtype == torch.float32
    with torch.no_grad():
        weight.view(-1)[0] = 1e6
    with pytest.raises(otbr_hub.OtbrError, match="does not fit in float16"):
        result.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_in_memory_model_is_not_handed_back_with_overflowed_weights() -> None:
    from otbr_hub.repair import _same_kind

    original = tiny_timm().half()
    repaired = tiny_timm()
    with torch.no_grad():
        repaired.conv1.weight.view(-1)[0] = 1e6
    with pytest.raises(otbr_hub.OtbrError, match="conv1.weight does not fit in float16"):
        _same_kind(original, repaired, torch.float16)
