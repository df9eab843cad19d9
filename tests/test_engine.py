"""Engine acceptance tests: input left untouched, exact pruning, fusion arithmetic worked
out by hand, determinism, dtypes, and end-to-end repair of timm/transformers models."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from otbr_hub.errors import OtbrError, UsageError
from otbr_hub.fuse import fuse, target_mass
from otbr_hub.layers import Layer, classifier_name, select_layers
from otbr_hub.load import from_model
from otbr_hub.prune import prune, top_neurons
from otbr_hub.repair import repair
from otbr_hub.score import Scores, neuron_weight_change
from otbr_hub.settings import RepairSettings, preset
from otbr_hub.unlearn import unlearn

repair_mod = importlib.import_module("otbr_hub.repair")  # the package re-exports a function of that name

FAST = dict(unlearn_steps=2, unlearn_batch=8, verify_samples=8, device="cpu", detector=False)


# --------------------------------------------------------------------------- models


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, a hidden Linear and a Linear classifier (plain torch)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 7)
        self.fc = nn.Linear(7, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(F.relu(self.fc1(x)))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial BatchNorm state, so silencing/keeping it is visible
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(7)
    return m.eval()


CNN_SPEC = dict(input_size=(3, 16, 16))


def tiny_timm_resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8,
                             num_classes=10).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- the input is never modified


@pytest.mark.parametrize("build,kw", [(tiny_timm_resnet, {"input_size": (3, 32, 32)}), (small_cnn, CNN_SPEC)],
                         ids=["timm-resnet", "torch-cnn"])
def test_repair_leaves_input_bit_identical(build, kw):
    model = build().train()  # train mode: any forward on the input itself would move BN statistics
    before = snapshot(model)
    grads = [p.requires_grad for p in model.parameters()]
    assert any(k.endswith("running_mean") for k in before)
    res = repair(model, prune_ratio=0.1, **FAST, **kw)
    assert_state_equal(before, snapshot(model))
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    assert res.model is not model
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())


# --------------------------------------------------------------------------- pruning


def cnn_layers_and_scores(seed: int = 3):
    model = small_cnn()
    layers = select_layers(model, preset("default", skip_stem=False))
    g = torch.Generator().manual_seed(seed)
    rank = {l.name: torch.rand(l.n_out, generator=g, dtype=torch.float64) for l in layers}
    nwc = {n: v.abs() + 0.1 for n, v in rank.items()}
    return model, layers, Scores(nwc=nwc, rank=rank, ranking="global")


def test_cnn_layer_rule():
    model, layers, _ = cnn_layers_and_scores()
    assert [l.name for l in layers] == ["conv1", "conv2", "fc1"]
    assert classifier_name(model) == "fc"
    assert [l.norm_name for l in layers] == ["bn1", "bn2", None]
    # the default preset leaves the stem (first layer) alone; the paper preset does not
    assert [l.name for l in select_layers(model, preset("default"))] == ["conv2", "fc1"]
    assert [l.name for l in select_layers(model, preset("paper"))] == ["conv1", "conv2"]


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.01])
@pytest.mark.parametrize("silence_norm", [True, False])
def test_prune_zeroes_exactly_top_k(ratio, silence_norm):
    model, layers, scores = cnn_layers_and_scores()
    before = snapshot(model)
    total = sum(l.n_out for l in layers)
    k = max(1, math.floor(ratio * total))
    flat = sorted(((float(v), name, i) for name, t in scores.rank.items() for i, v in enumerate(t)), reverse=True)
    expected: dict[str, set[int]] = {l.name: set() for l in layers}
    for _, name, i in flat[:k]:
        expected[name].add(i)

    res = prune(model, layers, scores, ratio, silence_norm=silence_norm)
    assert res.k == k and res.total == total
    assert {n: set(v) for n, v in res.pruned.items()} == expected
    assert_state_equal(before, snapshot(model))  # the input model is untouched

    after = res.model.state_dict()
    norm_of = {l.name: l.norm_name for l in layers}
    touched = set()
    for name, idx in expected.items():
        if not idx:
            continue
        rows = sorted(idx)
        keep = [i for i in range(before[f"{name}.weight"].shape[0]) if i not in idx]
        for t in ("weight", "bias"):
            key = f"{name}.{t}"
            if key not in before:
                continue
            touched.add(key)
            assert before[key][rows].abs().sum() > 0
            assert torch.all(after[key][rows] == 0)
            assert torch.equal(after[key][keep], before[key][keep])
        norm = norm_of[name]
        if norm and silence_norm:
            for t in ("weight", "bias"):
                key = f"{norm}.{t}"
                touched.add(key)
                assert torch.all(after[key][rows] == 0)
                assert torch.equal(after[key][keep], before[key][keep])
    for key, v in before.items():  # everything else, running statistics included, is unchanged
        if key not in touched:
            assert torch.equal(after[key], v), key


def test_top_neurons_ties_follow_layer_then_channel_order():
    names = ["a", "b"]
    rank = {n: torch.ones(3, dtype=torch.float64) for n in names}
    s = Scores(nwc=rank, rank=rank, ranking="global")
    assert top_neurons(s, 0.5) == {"a": [0, 1, 2], "b": []}
    assert top_neurons(s, 0.7) == {"a": [0, 1, 2], "b": [0]}


# --------------------------------------------------------------------------- fusion


def test_fuse_lambda_zero_returns_original_exactly():
    model, layers, scores = cnn_layers_and_scores()
    pr = prune(model, layers, scores, 0.3, silence_norm=True)
    for attached in (True, False):
        fr = fuse(model, pr.model, layers, scores.nwc, pr.pruned, 0.0, fuse_attached=attached)
        assert fr.fused_layers  # the fusion really ran
        assert_state_equal(snapshot(model), snapshot(fr.model))


def test_repair_lambda_zero_returns_input_weights():
    model = small_cnn()
    res = repair(model, prune_ratio=0.2, lam=0.0, **FAST, **CNN_SPEC)
    assert_state_equal(snapshot(model), snapshot(res.model))


def _seq(*mods: nn.Module) -> nn.Sequential:
    return nn.Sequential(*mods)


def test_fuse_hand_worked_split_and_chain():
    """Layer A (2 neurons): pruned neuron 0, masses b = (1/4, 3/4), so the plan must split.

    W_bd = [[1,0],[0,1]], W_pn = [[0,0],[0,1]]; costs C = [[1, 1], [sqrt2, 0]].
    Sending mass t from pruned neuron 1 to original 0 costs 0.5 + sqrt2 t, so t = 0:
    T = [[1/4, 1/4], [0, 1/2]], diag(1/b) T^T = [[1, 0], [1/3, 2/3]],
    fused = [[0, 0], [0, 2/3]] -> 0.5 fused + 0.5 W_bd = [[1/2, 0], [0, 5/6]].
    Bias (carried with its neuron): 0.5 [[1,0],[1/3,2/3]] (0, 2) + 0.5 (1, 2) = (1/2, 5/3).

    Layer B (2 -> 2, nothing pruned, uniform NWC): its input axis is aligned with
    A = T diag(1/b) = [[1, 1/3], [0, 2/3]], so W_al = W_B A = [[1, 5/3], [3, 11/3]]; its
    own plan is diag(1/2) (zero cost on the diagonal), so the result is
    0.5 W_al + 0.5 W_B = [[1, 11/6], [3, 23/6]].
    """
    orig = _seq(nn.Linear(2, 2), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        orig[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        orig[0].bias.copy_(torch.tensor([1.0, 2.0]))
        orig[1].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    pruned = copy.deepcopy(orig)
    with torch.no_grad():
        pruned[0].weight[0] = 0
        pruned[0].bias[0] = 0
    layers = [Layer("0", orig[0], "linear"), Layer("1", orig[1], "linear")]
    nwc = {"0": torch.tensor([1.0, 3.0], dtype=torch.float64), "1": torch.tensor([2.0, 2.0], dtype=torch.float64)}
    fr = fuse(orig, pruned, layers, nwc, {"0": [0], "1": []}, 0.5, fuse_attached=True)
    out = fr.model
    torch.testing.assert_close(out[0].weight, torch.tensor([[0.5, 0.0], [0.0, 5 / 6]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0].bias, torch.tensor([0.5, 5 / 3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1].weight, torch.tensor([[1.0, 11 / 6], [3.0, 23 / 6]]), rtol=0, atol=1e-6)
    assert fr.first_layer == "0" and fr.aligned_layers == ["1"]
    # without attached tensors the bias stays the original's
    fr2 = fuse(orig, pruned, layers, nwc, {"0": [0], "1": []}, 0.5, fuse_attached=False)
    assert torch.equal(fr2.model[0].bias, orig[0].bias)
    torch.testing.assert_close(fr2.model[0].weight, out[0].weight)


def test_fuse_recovers_a_permuted_conv_chain():
    """If the "pruned" model is the original with its layer-A filters cyclically permuted
    (sigma = (1, 2, 0), no zeros) and layer B's input channels permuted to match, the plan
    is the permutation, the input alignment undoes it on layer B's input axis, and fusion
    gives back the original exactly, whatever lambda. A 3-cycle is not its own inverse,
    so a transposed plan or alignment would fail here; 2x2 kernels check that alignment
    acts at every kernel position."""
    torch.manual_seed(1)
    orig = _seq(nn.Conv2d(2, 3, 2, bias=False), nn.Conv2d(3, 2, 2, bias=False))
    with torch.no_grad():
        orig[0].weight.mul_(10)
        # B's own plan is computed on its *un-aligned* (column-permuted) weights, as in the
        # reference; a large opposite offset per row keeps that plan the identity.
        orig[1].weight[0] -= 5
        orig[1].weight[1] += 5
    sigma = [1, 2, 0]  # pruned neuron p is original neuron sigma[p]
    pruned = copy.deepcopy(orig)
    with torch.no_grad():
        pruned[0].weight.copy_(orig[0].weight[sigma])
        pruned[1].weight.copy_(orig[1].weight[:, sigma])
    layers = [Layer("0", orig[0], "conv"), Layer("1", orig[1], "conv")]
    nwc = {"0": torch.ones(3, dtype=torch.float64), "1": torch.ones(2, dtype=torch.float64)}
    for lam in (0.5, 1.0):
        fr = fuse(orig, pruned, layers, nwc, {"0": [0]}, lam)
        torch.testing.assert_close(fr.model[0].weight, orig[0].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(fr.model[1].weight, orig[1].weight, rtol=0, atol=1e-6)
        assert fr.plan_cost["0"] == pytest.approx(0.0, abs=1e-9)


def test_fuse_leaves_layers_before_first_pruned_alone():
    model, layers, scores = cnn_layers_and_scores()
    pr = prune(model, layers, scores, 0.01)
    pr.pruned = {"conv1": [], "conv2": [1], "fc1": []}
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.conv2.weight[1] = 0
    fr = fuse(model, pruned, layers, scores.nwc, pr.pruned, 0.5)
    assert fr.first_layer == "conv2" and fr.fused_layers == ["conv2", "fc1"]
    assert torch.equal(fr.model.conv1.weight, model.conv1.weight)
    assert torch.equal(fr.model.bn1.weight, model.bn1.weight)
    assert not torch.equal(fr.model.conv2.weight, model.conv2.weight)


def test_target_mass_guards_zero_nwc():
    b = target_mass(np.array([0.0, 1.0, 3.0, 0.0]))
    assert np.all(np.isfinite(1.0 / b)) and np.all(b > 0)
    assert b.sum() == pytest.approx(1.0)
    assert b[2] / b[1] == pytest.approx(3.0)
    u = target_mass(np.zeros(4))
    assert np.allclose(u, 0.25)
    w = target_mass(np.array([np.nan, np.inf, 2.0]))
    assert np.all(np.isfinite(1.0 / w)) and w.sum() == pytest.approx(1.0)


def test_fuse_with_zero_nwc_has_no_nan():
    model, layers, scores = cnn_layers_and_scores()
    nwc = {n: v.clone() for n, v in scores.nwc.items()}
    nwc["conv2"][[0, 2]] = 0.0  # some neurons never moved
    nwc["fc1"][:] = 0.0  # a layer that never moved at all
    pr = prune(model, layers, scores, 0.3)
    fr = fuse(model, pr.model, layers, nwc, pr.pruned, 0.5)
    for k, v in fr.model.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_weights_different_seed_different_nwc():
    model = small_cnn()
    a = repair(model, prune_ratio=0.2, seed=3, **FAST, **CNN_SPEC)
    b = repair(model, prune_ratio=0.2, seed=3, **FAST, **CNN_SPEC)
    assert_state_equal(snapshot(a.model), snapshot(b.model))

    settings = preset("default", unlearn_steps=2, unlearn_batch=8)
    spec = from_model(model, **CNN_SPEC).spec
    layers = select_layers(model, settings)
    nwc = {}
    for seed in (0, 1):
        s = preset("default", unlearn_steps=2, unlearn_batch=8, seed=seed)
        un = unlearn(model, spec, s)
        nwc[seed] = neuron_weight_change(model, un.model, layers, s).nwc
    again = neuron_weight_change(model, unlearn(model, spec, preset("default", unlearn_steps=2, unlearn_batch=8)).model,
                                 layers, settings).nwc
    for name in nwc[0]:
        assert torch.equal(nwc[0][name], again[name])
        assert nwc[0][name].abs().sum() > 0
    assert any(not torch.allclose(nwc[0][n], nwc[1][n]) for n in nwc[0])


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_repair_keeps_dtype_and_structure(dtype, monkeypatch):
    model = small_cnn().to(dtype)
    seen = []
    real_unlearn = repair_mod.unlearn

    def spy(m, *a, **k):
        seen.append({p.dtype for p in m.parameters()})
        return real_unlearn(m, *a, **k)

    monkeypatch.setattr(repair_mod, "unlearn", spy)
    res = repair(model, prune_ratio=0.2, **FAST, **CNN_SPEC)
    assert seen == [{torch.float32}]  # the engine computes in fp32
    ref, out = model.state_dict(), res.model.state_dict()
    assert list(ref) == list(out)
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == ref[k].dtype, k
    assert type(res.model) is type(model)
    assert res.report.source_dtype == str(dtype).replace("torch.", "")
    assert any(not torch.equal(ref[k], out[k]) for k in ref)
    with torch.no_grad():
        y = res.model(torch.rand(2, 3, 16, 16, dtype=dtype))
    assert y.dtype == dtype and y.shape == (2, 5) and torch.isfinite(y).all()


# --------------------------------------------------------------------------- architectures


def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                             num_classes=10).eval()


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=48,
                                               num_attention_heads=2, intermediate_size=96, num_labels=10)).eval()


def hf_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                     layer_type="basic", num_labels=10, image_size=32)).eval()


def hf_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    return ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                         num_labels=10, image_size=32)).eval()


def timm_tiny(name: str):
    def build():
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=10).eval()

    return build


def _expected_layers(model: nn.Module) -> tuple[int, int, str]:
    """Independent count: Conv2d outside shortcut/downsample paths, and Linear, minus the head
    and minus the stem (the first Conv2d/Linear of the model)."""
    head = classifier_name(model)
    convs = lins = 0
    stem = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and stem is None:
            stem = name
            continue
        if name == head:
            continue
        if isinstance(m, nn.Conv2d) and not any(p in name.split(".") for p in ("shortcut", "downsample")):
            convs += 1
        elif isinstance(m, nn.Linear):
            lins += 1
    return convs, lins, head


ARCHS = {
    "timm-vit": (timm_vit, (3, 32, 32), "head"),
    "hf-vit": (hf_vit, None, "classifier"),
    "timm-convnext": (timm_tiny("test_convnext"), (3, 32, 32), "head.fc"),
    "timm-efficientnet": (timm_tiny("test_efficientnet"), (3, 32, 32), "classifier"),
    "hf-resnet": (hf_resnet, None, "classifier.1"),
    "hf-convnext": (hf_convnext, None, "classifier"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_repair_architectures_end_to_end(arch):
    build, size, head = ARCHS[arch]
    model = build()
    before = snapshot(model)
    res = repair(model, prune_ratio=0.05, input_size=size, **FAST)
    assert_state_equal(before, snapshot(model))
    assert type(res.model) is type(model)
    convs, lins, found_head = _expected_layers(model)
    assert found_head == head
    rep = res.report
    assert rep.layers_scored == convs + lins
    layers = select_layers(model, preset("default"))
    assert head not in {l.name for l in layers}
    assert sum(l.kind == "linear" for l in layers) == lins
    if arch in ("timm-vit", "hf-vit", "timm-convnext", "hf-convnext"):
        assert lins > 0  # transformer / channel-MLP neurons are scored
    assert rep.neurons_scored == sum(l.n_out for l in layers)
    assert rep.neurons_pruned == max(1, int(0.05 * rep.neurons_scored))
    assert sum(rep.pruned_per_layer.values()) == rep.neurons_pruned
    assert rep.fusion["fused_layers"] >= 1
    assert res.model.state_dict().keys() == before.keys()
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())
    spec = res.source.spec
    with torch.no_grad():
        x = torch.rand(2, spec.channels, spec.height, spec.width)
        y = res.model(pixel_values=x).logits if res.source.library == "transformers" else res.model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ["timm-vit", "hf-vit"])
def test_repair_vit_auto_ratio(arch):
    build, size, head = ARCHS[arch]
    model = build()
    res = repair(model, prune_ratio="auto", input_size=size, **FAST)
    rep = res.report
    grid = preset("default").grid()
    assert rep.prune_ratio in grid
    assert rep.ratio_candidates and rep.ratio_candidates[0]["ratio"] == grid[0]
    assert rep.neurons_pruned == max(1, int(rep.prune_ratio * rep.neurons_scored))
    assert type(res.model) is type(model)
    assert any(k for k, v in rep.pruned_per_layer.items() if v and k != head)


def test_timm_vit_input_size_from_model():
    res = repair(timm_vit(), prune_ratio=0.05, **FAST)
    assert res.source.spec.height == 32


@pytest.mark.parametrize("arch,dtype", [("hf-vit", torch.float16), ("timm-vit", torch.bfloat16)])
def test_repair_library_models_in_half_precision(arch, dtype):
    build, size, _ = ARCHS[arch]
    model = build().to(dtype)
    before = snapshot(model)
    res = repair(model, prune_ratio=0.05, input_size=size, **FAST)
    assert_state_equal(before, snapshot(model))
    out = res.model.state_dict()
    assert type(res.model) is type(model) and out.keys() == before.keys()
    assert all(out[k].dtype == before[k].dtype and out[k].shape == before[k].shape for k in before)
    x = torch.rand(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        y = res.model(pixel_values=x).logits if arch.startswith("hf") else res.model(x)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()


# --------------------------------------------------------------------------- memory slicing


def test_unlearn_slices_sum_to_the_whole_batch():
    """Slicing a step's batch (for memory) gives the unsliced update: exactly the same
    weights in eval mode up to float rounding, and a close ranking in train mode, where only
    BatchNorm's batch statistics come from the slice."""
    model = small_cnn()
    spec = from_model(model, input_size=(3, 8, 8)).spec
    layers = select_layers(model, preset("default"))
    whole, sliced = (
        unlearn(model, spec, preset("default", unlearn_steps=3, unlearn_batch=12, unlearn_train_mode=False, unlearn_chunk=c)).model
        for c in (None, 5)
    )
    for (name, a), (_, b) in zip(whole.named_parameters(), sliced.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    train_whole, train_sliced = (
        neuron_weight_change(model, unlearn(model, spec, preset("default", unlearn_steps=3, unlearn_batch=12,
                                                                 unlearn_chunk=c)).model, layers, preset("default"))
        for c in (None, 6)
    )
    a = torch.cat([v.flatten() for v in train_whole.nwc.values()]).numpy()
    b = torch.cat([v.flatten() for v in train_sliced.nwc.values()]).numpy()
    assert not np.allclose(a, b)  # train mode really did see other batch statistics
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_synthesized_inputs_do_not_depend_on_slicing():
    from otbr_hub.verify import synthesize_inputs

    model = small_cnn()
    spec = from_model(model, input_size=(3, 8, 8)).spec
    torch.testing.assert_close(synthesize_inputs(model, spec, 10, seed=3), synthesize_inputs(model, spec, 10, seed=3, chunk=3))


def test_agreement_with_known_reference_predictions_is_the_same():
    """The ratio walk passes the original's predictions once instead of recomputing them for
    every candidate; that must not change the agreement."""
    from otbr_hub.verify import agreement, predictions, verify

    model = small_cnn()
    spec = from_model(model, input_size=(3, 8, 8)).spec
    other = small_cnn()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x = torch.rand(64, 3, 8, 8, generator=gen)
    ref = predictions(model, spec, x)
    plain = agreement(model, other, spec, x)
    assert 0 < plain < 1  # the perturbed copy disagrees on some inputs, so the check has teeth
    assert agreement(model, other, spec, x, ref) == plain
    assert verify(model, other, spec, inputs=x, reference=ref).agreement == plain


def test_default_slices_follow_the_activation_budget():
    from otbr_hub.placement import activation_bytes_per_image, images_per_pass

    model = small_cnn()
    spec = from_model(model, input_size=(3, 32, 32)).spec
    per_image = activation_bytes_per_image(model, spec)
    # every leaf's output of one 32x32 image: conv/bn/relu maps, pooled and linear outputs
    assert per_image >= 4 * 32 * 32 * (4 + 4 + 6 + 6)
    assert images_per_pass(model, spec) >= 256  # small models: the paper's batch in one pass
    assert images_per_pass(model, spec, budget=10 * per_image) == 10
    assert images_per_pass(model, spec, budget=1) == 1
    assert activation_bytes_per_image(model, spec, side=16) < per_image
    with pytest.raises(Exception, match="unlearn-chunk"):
        preset("default", unlearn_chunk=0)


def test_gpu_budget_follows_total_memory_unless_the_gpu_is_busy(caplog):
    """Free GPU memory changes from run to run; slices sized by it would change BatchNorm's
    batch statistics and so the weights. The total does not."""
    from otbr_hub.placement import GPU_ACTIVATION_SHARE, gpu_activation_budget

    gib = 2**30
    with caplog.at_level("WARNING", logger="otbr_hub"):
        quiet = {gpu_activation_budget(free * gib, 80 * gib) for free in (79, 60, 41)}
        assert quiet == {int(80 * gib * GPU_ACTIVATION_SHARE)} and not caplog.records
        assert gpu_activation_budget(10 * gib, 80 * gib) == 5 * gib
        assert "unlearn-chunk" in caplog.text


@pytest.mark.parametrize("ratio", [0.2, "auto"])
def test_repair_of_an_fp32_model_leaves_its_weights_and_modes_alone(ratio):
    """An fp32 model on the repair's device is read in place (no working copy): its
    weights, buffers and each submodule's train/eval flag are as they were afterwards."""
    model = small_cnn()
    model.train()
    model.bn2.eval()  # a mixed state that a plain .train()/.eval() could not restore
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    res = repair(model, input_size=(3, 8, 8), prune_ratio=ratio, **FAST)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert res.model is not model and res.report.neurons_pruned >= 1


# --------------------------------------------------------------------------- repair strength follows the scan


def _counting_detector(flag_original: bool):
    """A custom detector (the ``model -> (flagged, p)`` hook): flags only the first model it
    sees (the original) when asked to, and counts its calls."""
    calls: list[bool] = []

    def detector(model: nn.Module) -> tuple[bool, float]:
        flagged = flag_original and not calls
        calls.append(flagged)
        return flagged, 0.001 if flagged else 0.5

    return detector, calls


def test_auto_repair_is_light_when_nothing_flags_the_model():
    detector, calls = _counting_detector(flag_original=False)
    res = repair(small_cnn(), prune_ratio="auto", **{**FAST, "detector": detector}, **CNN_SPEC)
    rep = res.report
    s = preset("default")
    assert calls == [False]  # the original only: no walk, no scan afterwards
    assert rep.lam == rep.fusion["lambda"] == s.clean_lambda < s.lam
    assert rep.prune_ratio == s.fallback_ratio
    assert "lightly" in rep.ratio_reason and f"lambda {s.clean_lambda:g}" in rep.ratio_reason
    # the light fusion is exactly the fixed-ratio repair with that lambda
    fixed = repair(small_cnn(), prune_ratio=s.fallback_ratio, lam=s.clean_lambda, **FAST, **CNN_SPEC)
    for k, v in fixed.model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), k


def test_auto_repair_walks_at_full_strength_when_the_detector_flags_the_model():
    detector, calls = _counting_detector(flag_original=True)
    res = repair(small_cnn(), prune_ratio="auto", clean_lambda=0.0, **{**FAST, "detector": detector}, **CNN_SPEC)
    rep = res.report
    grid = preset("default").grid()
    assert rep.lam == rep.fusion["lambda"] == 0.5
    assert rep.prune_ratio == grid[0] and "no longer significant" in rep.ratio_reason
    assert calls == [True, False, False]  # original, first candidate, the scan after repair


def _walk(p_values: dict[float, float], agreements: dict[float, float] | None = None):
    """choose_ratio over the default grid with a detector that always flags, returning these p-values."""
    from otbr_hub.ratio import choose_ratio

    built: list[float] = []

    def build(r: float) -> nn.Module:
        built.append(r)
        m = nn.Linear(1, 1)
        m.ratio = r
        return m

    agree = (lambda m: agreements[m.ratio]) if agreements else (lambda m: 0.9)
    choice, model = choose_ratio(sorted(p_values), build, agree, 0.5, 0.05,
                                 detector=lambda m: (True, p_values[m.ratio]), original_flagged=True)
    assert model.ratio == choice.ratio  # the model returned is the one chosen
    return choice, built


def test_a_walk_that_never_unflags_ends_where_the_statistic_was_weakest():
    """A statistic that does not weaken with more pruning (a natural outlier, as on a clean
    MobileNetV3) must not send the walk to the most damaging ratio."""
    choice, built = _walk({0.01: 0.02, 0.02: 0.0005, 0.03: 0.003, 0.05: 0.004})
    assert choice.ratio == 0.01 and "did not weaken" in choice.reason and "not the largest (0.05)" in choice.reason
    assert built == [0.01, 0.02, 0.03, 0.05, 0.01]  # the chosen candidate is rebuilt (builds are deterministic)
    # a statistic that weakens as more is pruned still ends at the largest ratio
    choice, built = _walk({0.01: 0.001, 0.02: 0.005, 0.03: 0.02, 0.05: 0.04})
    assert choice.ratio == 0.05 and "used the largest" in choice.reason and built == [0.01, 0.02, 0.03, 0.05]
    # ties go to the smaller ratio; candidates past the agreement guard are never chosen
    choice, _ = _walk({0.01: 0.01, 0.02: 0.03, 0.03: 0.03, 0.05: 0.9}, {0.01: 0.9, 0.02: 0.9, 0.03: 0.9, 0.05: 0.3})
    assert choice.ratio == 0.02


def test_low_agreement_is_reported_as_a_warning(caplog):
    from otbr_hub.verify import LOW_AGREEMENT, low_agreement_warning

    assert low_agreement_warning(None) is None and low_agreement_warning(LOW_AGREEMENT) is None
    assert "agreement 0.500" in low_agreement_warning(0.5)
    model = small_cnn()
    with torch.no_grad():  # a random CNN sends every probe to one class; this one tells them apart
        model.fc.bias.zero_(), model.fc1.bias.zero_(), model.fc.weight.mul_(10)
        model.bn1.running_mean.zero_(), model.bn2.running_mean.zero_()
    kw = {**FAST, "verify_samples": 32, **CNN_SPEC}
    with caplog.at_level("WARNING", logger="otbr_hub"):
        rep = repair(model, prune_ratio=0.5, lam=1.0, **kw).report  # half the neurons gone, full strength
    assert rep.verification["agreement"] < LOW_AGREEMENT
    assert rep.warnings == [low_agreement_warning(rep.verification["agreement"])]
    assert rep.to_dict()["warnings"] == rep.warnings and any("disagrees" in r.message for r in caplog.records)
    # lambda 0: the original itself, so no disagreement, only the warning that nothing changed
    (only,) = repair(model, prune_ratio=0.5, lam=0.0, **kw).report.warnings
    assert "disagrees" not in only and only.startswith("lambda 0")


def test_fixed_ratio_and_no_detector_keep_full_strength():
    for kw in (dict(prune_ratio=0.2), dict(prune_ratio="auto")):  # FAST has detector=False
        rep = repair(small_cnn(), clean_lambda=0.0, **kw, **FAST, **CNN_SPEC).report
        assert rep.lam == rep.fusion["lambda"] == 0.5, kw


def test_clean_lambda_is_validated():
    with pytest.raises(UsageError, match="--clean-lambda"):
        preset("default", clean_lambda=1.5)


# --------------------------------------------------------------------------- which layers feed which (fuse_chain)


class ResidualNet(nn.Module):
    """stem -> [a -> BN -> ReLU -> b] + skip -> c -> pool -> fc: ``a`` feeds ``b`` alone,
    ``b`` writes into a residual sum that ``c`` reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.bn(self.a(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c(x)), 1).flatten(1))


def _links(model, **spec):
    from otbr_hub.fuse import dataflow_links

    lm = from_model(model, **spec)
    layers = select_layers(model, preset("default"))
    return {l.name: k for l, k in zip(layers, dataflow_links(model, lm.spec, layers))}


def test_dataflow_links_follow_the_graph_not_the_parameter_order():
    torch.manual_seed(0)
    assert _links(ResidualNet().eval(), input_size=(3, 8, 8)) == {"a": True, "b": False, "c": False}
    # timm resnet: conv1 -> conv2 inside a block; conv2 writes the residual sum (timm starts
    # each block's last BatchNorm at zero scale, which makes that branch dead and any
    # re-ordering of it harmless: give the norms trained-looking scales first)
    resnet = tiny_timm_resnet()
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    links = _links(resnet, input_size=(3, 32, 32))
    assert links["layer1.0.conv1"] and not links["layer1.0.conv2"] and not links["layer4.0.conv2"]
    # transformers ViT: only the MLP's hidden layer; values -> output projection is not a
    # link either, since a re-ordering across heads changes which attention weights apply
    from tiny import tiny_vit

    links = _links(tiny_vit(), input_size=(3, 32, 32))
    blk = "vit.layers.0."
    assert links[blk + "mlp.fc1"]
    for name in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc2"):
        assert not links[blk + name], name


class _Pair(nn.Module):
    """a -> (something) -> b -> fc, with the something chosen by ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        groups = 6 if kind == "depthwise" else 1
        self.a = nn.Conv2d(6, 6, 3, padding=1, groups=groups)
        self.norm = nn.GroupNorm(2, 6) if kind == "groupnorm" else nn.Identity()
        self.b = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = x.repeat(1, 2, 1, 1)
        h = self.a(x)
        y = self.b(F.relu(self.norm(h)))
        if self.kind == "second-reader":  # a's output also reaches the head directly
            y = y + h
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("kind,linked", [("plain", True), ("second-reader", False), ("groupnorm", False),
                                         ("depthwise", False)])
def test_dataflow_links_refuse_what_a_re_ordering_would_break(kind, linked):
    from otbr_hub.fuse import dataflow_links

    torch.manual_seed(0)
    model = _Pair(kind).eval()
    if kind == "groupnorm":
        with torch.no_grad():
            model.norm.weight.uniform_(0.5, 1.5)
            model.norm.bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = from_model(model, input_size=(3, 6, 6)).spec
    layers = [Layer("a", model.a, "conv"), Layer("b", model.b, "conv")]
    assert dataflow_links(model, spec, layers) == [linked, False]
    for k, v in model.state_dict().items():  # the probe puts every weight back
        assert torch.equal(v, before[k]), k


def test_dataflow_fusion_undoes_a_permutation_of_a_linked_layer():
    """The pruned copy is the original with layer a's neurons permuted (and b's inputs to
    match): with uniform NWC the plan is that permutation, and the data-flow fusion maps a
    back and aligns b, giving the original exactly at any lambda."""
    from otbr_hub.fuse import dataflow_links

    torch.manual_seed(0)
    model = ResidualNet().eval()
    with torch.no_grad():
        model.a.weight.mul_(10)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    spec = from_model(model, input_size=(3, 8, 8)).spec
    layers = select_layers(model, preset("default"))
    links = dataflow_links(model, spec, layers)
    assert links == [True, False, False]
    sigma = torch.tensor([1, 2, 0, 4, 5, 3])
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.a.weight.copy_(model.a.weight[sigma])
        for t in ("weight", "bias", "running_mean", "running_var"):
            getattr(pruned.bn, t).copy_(getattr(model.bn, t)[sigma])
        pruned.b.weight.copy_(model.b.weight[:, sigma])
    nwc = {l.name: torch.ones(l.n_out, dtype=torch.float64) for l in layers}
    for lam in (0.5, 1.0):
        fr = fuse(model, pruned, layers, nwc, {"a": [0]}, lam, links=links)
        assert fr.mapped_layers == ["a"] and fr.aligned_layers == ["b"]
        for k, v in model.state_dict().items():
            torch.testing.assert_close(fr.model.state_dict()[k], v, rtol=0, atol=1e-5)


def test_dataflow_fusion_keeps_the_residual_stream_in_order():
    """With uniform NWC mass the OT plan is a permutation: unpruned neurons stay, pruned
    (zero) ones swap among themselves. At lambda 1 the dataflow fusion is then exactly the
    pruned model as a function. The reference chain also permutes the *inputs* of the layer
    after the residual sum among the pruned channels, which the skip path still fills, so it
    computes something else."""
    from otbr_hub.fuse import dataflow_links

    torch.manual_seed(0)
    model = ResidualNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
    spec = from_model(model, input_size=(3, 8, 8)).spec
    layers = select_layers(model, preset("default"))
    nwc = {l.name: torch.ones(l.n_out, dtype=torch.float64) for l in layers}
    pruned = copy.deepcopy(model)
    idx = {"a": [1, 4], "b": [0, 3], "c": [2, 5]}
    with torch.no_grad():
        for name, rows in idx.items():
            getattr(pruned, name).weight[rows] = 0
            if getattr(pruned, name).bias is not None:
                getattr(pruned, name).bias[rows] = 0
        pruned.bn.weight[idx["a"]] = 0
        pruned.bn.bias[idx["a"]] = 0
    x = spec.normalize(torch.rand(5, 3, 8, 8))
    links = dataflow_links(model, spec, layers)
    flow = fuse(model, pruned, layers, nwc, idx, 1.0, links=links)
    order = fuse(model, pruned, layers, nwc, idx, 1.0)
    with torch.no_grad():
        want = pruned(x)
        torch.testing.assert_close(flow.model(x), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(order.model(x), want, rtol=1e-3, atol=1e-3)
    assert flow.mapped_layers == ["a"] and order.mapped_layers == ["a", "b", "c"]


def test_fusion_without_links_is_the_plain_average():
    model, layers, scores = cnn_layers_and_scores()
    pr = prune(model, layers, scores, 0.3)
    fr = fuse(model, pr.model, layers, scores.nwc, pr.pruned, 0.25, links=[False] * len(layers))
    assert fr.mapped_layers == []
    for l in layers[layers.index(next(l for l in layers if pr.pruned.get(l.name))):]:
        want = 0.25 * dict(pr.model.named_modules())[l.name].weight + 0.75 * l.module.weight
        torch.testing.assert_close(dict(fr.model.named_modules())[l.name].weight, want)


def test_paper_preset_keeps_the_reference_chain():
    assert preset("paper").fuse_chain == "order" and preset("default").fuse_chain == "dataflow"
    with pytest.raises(UsageError, match="--fuse-chain"):
        preset("default", fuse_chain="graph")


def test_layer_cap_spreads_the_budget_over_layers():
    rank = {"a": torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5]),
            "b": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])}
    scores = Scores(nwc=rank, rank=rank, ranking="global")
    assert top_neurons(scores, 0.2) == {"a": [0, 1, 2, 3], "b": []}
    # cap 1: at most floor(1 * 0.2 * 10) = 2 per layer, the rest goes to layer b's best
    assert top_neurons(scores, 0.2, layer_cap=1.0) == {"a": [0, 1], "b": [0, 1]}
    # a cap no layer reaches changes nothing
    assert top_neurons(scores, 0.2, layer_cap=5.0) == top_neurons(scores, 0.2)
    # every layer full: fewer neurons than the budget, never more than the cap
    assert top_neurons(scores, 0.3, layer_cap=0.5) == {"a": [0], "b": [0]}
    assert preset("paper").layer_cap == 0 and preset("default").layer_cap == 2
    with pytest.raises(UsageError, match="--layer-cap"):
        preset("default", layer_cap=-1)


class PositionBiasNet(nn.Module):
    """A Linear run on a constant table (like Swin-v2's position-bias MLP), then the body."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.rand(1, 6))
        self.pos = nn.Linear(6, 6)
        self.a = nn.Linear(12, 6)
        self.b = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = x.flatten(1)[:, :12] + 0.0
        h = F.relu(self.a(h)) + self.pos(self.table)
        return self.fc(F.relu(self.b(h)))


def test_dataflow_links_of_a_model_with_a_constant_table():
    torch.manual_seed(0)
    from otbr_hub.fuse import dataflow_links

    model = PositionBiasNet().eval()
    spec = from_model(model, input_size=(3, 2, 2)).spec
    layers = [Layer(n, getattr(model, n), "linear") for n in ("pos", "a", "b")]
    # pos's output is one table added to every image's features: re-ordering it changes the
    # model, and so does re-ordering a's (the table is added in the old order); only b's
    # readers could follow, and b is the last scored layer
    assert dataflow_links(model, spec, layers) == [False, False, False]


# --------------------------------------------------------------------------- inputs the engine must refuse or survive


def test_frozen_model_under_no_grad_is_repaired_and_every_layer_scored():
    """A caller's ``torch.no_grad()`` and frozen parameters (fine-tuning style) must not stop
    the unlearning, nor make the frozen layers score zero; the caller's flags stay as they were."""
    model = small_cnn()
    model.requires_grad_(False)
    with torch.no_grad():
        res = repair(model, prune_ratio=0.2, **FAST, **CNN_SPEC)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(v["max"] > 0 for v in res.report.nwc["layers"].values()), res.report.nwc["layers"]
    settings = preset(**{k: v for k, v in FAST.items() if k != "detector"})
    spec = from_model(model, **CNN_SPEC).spec
    with torch.no_grad():
        un = unlearn(model, spec, settings)
    layers = select_layers(model, settings)
    assert all(float(v.max()) > 0 for v in neuron_weight_change(model, un.model, layers, settings).nwc.values())


def test_diverging_unlearning_is_an_error_not_a_nan_report():
    with pytest.raises(OtbrError, match="diverged.*--unlearn-lr"):
        repair(small_cnn(), prune_ratio=0.2, unlearn_lr=1e12, **{**FAST, "unlearn_steps": 6}, **CNN_SPEC)


def test_settings_that_cannot_run_are_refused_up_front():
    with pytest.raises(UsageError, match="ratio_grid .* at least one ratio"):
        preset(ratio_grid=" , ")
    with pytest.raises(UsageError, match="names the preset without applying it"):
        repair(small_cnn(), RepairSettings(preset="paper"), **CNN_SPEC)
    paper = preset("paper", normalize_noise=True)  # a preset with an override is applied, not refused
    assert paper.preset == "paper" and paper.normalize_noise and paper.layer_cap == 0.0
    assert dataclasses.replace(paper, lam=0.3).validate().fuse_chain == "order"
    with pytest.raises(UsageError, match="--include 'nothing-is-called-this' left none of the model's 2 scorable"):
        repair(small_cnn(), prune_ratio=0.2, include="nothing-is-called-this", **FAST, **CNN_SPEC)


def test_noise_size_a_fixed_size_vit_cannot_take_is_a_settings_error():
    for build in (timm_vit, hf_vit):
        with pytest.raises(UsageError, match=r"noise_size \(--noise-size\) 48: the model does not take 48x48"):
            repair(build(), prune_ratio=0.05, noise_size=48, **FAST)


def test_lambda_zero_without_bounds_warns_that_nothing_changed():
    model = small_cnn()
    res = repair(model, prune_ratio=0.2, lam=0.0, clip_sigma=0.0, **FAST, **CNN_SPEC)
    assert_state_equal(snapshot(model), snapshot(res.model))
    assert res.report.neurons_pruned > 0
    assert any("lambda 0" in w and "unchanged" in w for w in res.report.warnings), res.report.warnings


# ----- engine review (session 15) ------------------------------------------------------------------------------


class _HiddenFc(nn.Module):
    """A hidden layer named ``fc`` feeding the real class head ``out``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv(x)))).mean((2, 3))
        return self.out(F.relu(self.fc(x)))


def test_a_hidden_layer_called_fc_is_not_taken_for_the_class_head() -> None:
    model = _HiddenFc()
    assert classifier_name(model) == "out"
    assert [l.name for l in select_layers(model, RepairSettings())] == ["conv2", "fc"]


def test_a_batchnorm_without_affine_part_is_silenced_with_its_pruned_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    model[2].running_mean.uniform_(-1, 1)
    layers = select_layers(model, RepairSettings())
    assert [(l.name, l.norm_name) for l in layers] == [("1", "2")]
    scores = Scores(nwc={"1": torch.arange(6.0)}, rank={"1": torch.arange(6.0)}, ranking="raw")
    pr = prune(model, layers, scores, ratio=0.2)
    assert pr.pruned == {"1": [5]}
    with torch.no_grad():
        features = pr.model[:3](torch.randn(2, 1, 8, 8))
    assert features[:, 5].abs().max() == 0 and features[:, 4].abs().max() > 0


def test_the_reference_chain_never_maps_a_class_head_it_was_asked_to_score() -> None:
    torch.manual_seed(0)
    model = _HiddenFc().eval()
    result = repair(from_model(model, input_size=(1, 12, 12)), prune_ratio=0.2, fuse_chain="order", include_classifier=True,
                    **FAST)
    fusion = result.report.fusion
    assert fusion["fused_layers"] >= 2 and fusion["ot_mapped_layers"] == fusion["fused_layers"] - 1  # all but "out"


def test_beit_qkv_with_biases_in_its_parent_is_not_scored() -> None:
    model = timm.create_model("beit_base_patch16_224", depth=1, embed_dim=32, num_heads=2, img_size=32, patch_size=8,
                              num_classes=10)
    names = [l.name for l in select_layers(model, RepairSettings())]
    assert "blocks.0.attn.qkv" not in names and "blocks.0.mlp.fc1" in names


def test_single_image_train_mode_passes_are_a_settings_error() -> None:
    from tiny import tiny_timm

    with pytest.raises(UsageError, match="at least 2"):
        repair(from_model(tiny_timm(), input_size=(1, 28, 28)), prune_ratio=0.05, unlearn_steps=1, unlearn_batch=1,
               verify_samples=4, device="cpu", detector=False)


def test_pruned_neurons_a_filter_standardising_conv_gives_back_are_reported() -> None:
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(1, 8, 3, padding=1), nn.ReLU(), StdConv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    report = repair(from_model(model, input_size=(1, 12, 12)), prune_ratio=0.25, **FAST).report
    assert any("standardise their filters" in w for w in report.warnings), report.warnings
    report = repair(from_model(model, input_size=(1, 12, 12)), prune_ratio=0.25, lam=1.0, **FAST).report
    assert not any("standardise their filters" in w for w in report.warnings)


class _OddOrder(nn.Module):
    """Registers conv1, conv2, bn1, bn2 but computes bn1(conv1(x)) and bn2(conv2(.))."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.stem(x))))
        return self.head(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_the_batchnorm_attached_to_a_layer_is_the_one_that_reads_its_output() -> None:
    model = _OddOrder().eval()
    spec = from_model(model, input_size=(1, 8, 8)).spec
    assert [(l.name, l.norm_name) for l in select_layers(model, RepairSettings(), spec)] == [("conv1", "bn1"), ("conv2", "bn2")]


class _PreActBlock(nn.Module):
    """BackdoorBench's PreActBlock: ``out += shortcut`` in place, then the next block's bn1."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out += x
        return out


def test_a_batchnorm_reading_an_in_place_residual_sum_is_not_attached() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _PreActBlock(8), _PreActBlock(8), nn.BatchNorm2d(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    spec = from_model(model, input_size=(1, 8, 8)).spec
    attached = {l.name: l.norm_name for l in select_layers(model, RepairSettings(), spec)}
    assert attached == {"1.conv1": "1.bn2", "1.conv2": None, "2.conv1": "2.bn2", "2.conv2": None}
