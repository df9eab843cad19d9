"""The ``paper`` preset against an independent, loop-by-loop rewrite of the reference
procedure described in shared/OTBR.md (random unlearning, global NWC ranking, zeroing,
chained OT fusion) on a small PreAct-ResNet18-style CNN."""

from __future__ import annotations

import copy
import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otbr_hub.fuse import fuse
from otbr_hub.layers import select_layers
from otbr_hub.prune import prune
from otbr_hub.repair import repair
from otbr_hub.score import Scores
from otbr_hub.settings import preset


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet(nn.Module):
    """PreAct-ResNet18 layout (stem conv, pre-activation stages, final BN, Linear), tiny."""

    def __init__(self, widths=(8, 16, 32), blocks=(2, 1, 1), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        cin, stages = widths[0], []
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)


def preact(seed: int = 0) -> PreActResNet:
    torch.manual_seed(seed)
    return PreActResNet().eval()


# --------------------------------------------------------------------------- the oracle


def oracle_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n.split(".")]


def oracle_unlearn(model: nn.Module, *, steps=20, batch=256, lr=1e-4, momentum=0.9, seed=0, classes=10) -> nn.Module:
    """Gradient ascent on CE, raw [0,1) noise at 32x32, labels in 0..C-2, train mode."""
    # channels-last weights and inputs, as the engine uses for conv nets: the layout is not
    # part of the algorithm, but it changes float rounding (about 6e-4 relative in NWC after
    # 20 train-mode steps), and this test checks the arithmetic to 1e-6
    m = copy.deepcopy(model).float().train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.rand(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, classes - 1, (batch,), generator=g)
        loss = -F.cross_entropy(m(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def weights(model: nn.Module, names: list[str]) -> list[np.ndarray]:
    mods = dict(model.named_modules())
    return [mods[n].weight.detach().double().numpy().copy() for n in names]


def oracle_nwc(w0: list[np.ndarray], w1: list[np.ndarray]) -> list[np.ndarray]:
    return [np.abs(b - a).reshape(a.shape[0], -1).sum(1) for a, b in zip(w0, w1)]


def oracle_prune(w: list[np.ndarray], nwc: list[np.ndarray], ratio: float) -> tuple[list[np.ndarray], list[list[int]]]:
    flat = [(float(v), li, ch) for li, vals in enumerate(nwc) for ch, v in enumerate(vals)]
    flat.sort(key=lambda t: -t[0])
    k = max(1, math.floor(ratio * len(flat)))
    pruned = [x.copy() for x in w]
    idx: list[list[int]] = [[] for _ in w]
    for _, li, ch in flat[:k]:
        pruned[li][ch] = 0.0
        idx[li].append(ch)
    return pruned, [sorted(i) for i in idx]


def oracle_fuse(w_bd: list[np.ndarray], w_pn: list[np.ndarray], nwc: list[np.ndarray], idx: list[list[int]], lam: float):
    """The fusion as written in OTBR.md, with explicit loops for the input alignment.

    The cost matrix comes from POT's own ``ot.dist`` rather than a hand-written norm: when
    two or more neurons of a layer are pruned their zeroed filters are identical, the OT
    optimum is not unique, and which optimal plan ``ot.emd`` returns (which then feeds the
    next layer's input alignment) depends on rounding in the last bits of the costs.
    """
    out = [x.copy() for x in w_bd]
    s = next(i for i, v in enumerate(idx) if v)
    t_prev = b_prev = None
    for i in range(s, len(w_bd)):
        bd, pn = w_bd[i], w_pn[i]
        n = bd.shape[0]
        a = np.full(n, 1.0 / n)
        b = nwc[i] / nwc[i].sum()
        cost = ot.dist(pn.reshape(n, -1), bd.reshape(n, -1), metric="euclidean")
        for p in range(n):  # spot-check POT's distance against the definition
            assert cost[p, 0] == pytest.approx(np.sqrt(np.sum((pn[p] - bd[0]) ** 2)), rel=1e-6, abs=1e-6)
        t = ot.emd(a, b, cost)
        al = pn.copy()
        if i > s:
            amat = t_prev @ np.diag(1.0 / b_prev)
            for p in range(n):
                for kh in range(pn.shape[2]):
                    for kw in range(pn.shape[3]):
                        al[p, :, kh, kw] = pn[p, :, kh, kw] @ amat
        fused = (np.diag(1.0 / b) @ t.T @ al.reshape(n, -1)).reshape(bd.shape)
        out[i] = lam * fused + (1 - lam) * bd
        t_prev, b_prev = t, b
    return out


# --------------------------------------------------------------------------- tests


def test_paper_preset_values():
    s = preset("paper")
    assert (s.unlearn_steps, s.unlearn_batch, s.unlearn_lr, s.unlearn_momentum, s.lam) == (20, 256, 1e-4, 0.9, 0.5)
    assert s.label_off_by_one and not s.normalize_noise and s.unlearn_train_mode
    assert s.ranking == "global" and s.layer_types == "conv" and s.skip_shortcuts and not s.include_classifier
    assert not s.prune_norm and not s.fuse_attached
    assert preset("paper", lam=0.3).lam == 0.3  # overrides still apply on top


def test_paper_layer_rule():
    model = preact()
    layers = select_layers(model, preset("paper"))
    assert [l.name for l in layers] == oracle_layers(model)
    assert all(l.kind == "conv" for l in layers)
    assert not any("shortcut" in l.name or l.name == "linear" for l in layers)


@pytest.mark.parametrize("ratio,lam", [(0.1, 0.5), (0.25, 0.3)])
def test_paper_prune_and_fuse_match_oracle(ratio, lam):
    """Engine prune + fuse with the paper settings == the oracle, on given NWC values."""
    model = preact()
    settings = preset("paper", prune_ratio=ratio, lam=lam)
    layers = select_layers(model, settings)
    names = [l.name for l in layers]
    rng = np.random.default_rng(7)
    nwc = [rng.uniform(0.1, 1.0, l.n_out) * l.module.weight[0].numel() for l in layers]
    scores = Scores(nwc={n: torch.from_numpy(v) for n, v in zip(names, nwc)},
                    rank={n: torch.from_numpy(v) for n, v in zip(names, nwc)}, ranking="global")

    w_bd = weights(model, names)
    w_pn, idx = oracle_prune(w_bd, nwc, ratio)
    expected = oracle_fuse(w_bd, w_pn, nwc, idx, lam)

    pr = prune(model, layers, scores, ratio, silence_norm=settings.prune_norm)
    assert [pr.pruned[n] for n in names] == idx
    fr = fuse(model, pr.model, layers, scores.nwc, pr.pruned, settings.lam, fuse_attached=settings.fuse_attached)
    got = weights(fr.model, names)
    for n, e, g in zip(names, expected, got):
        assert np.allclose(g, e, rtol=1e-5, atol=1e-6), n
    _assert_rest_untouched(model, fr.model, names)


def _assert_rest_untouched(original: nn.Module, repaired: nn.Module, scored: list[str]) -> None:
    keys = {f"{n}.weight" for n in scored}
    ref = original.state_dict()
    for k, v in repaired.state_dict().items():
        if k not in keys:  # BatchNorm, shortcut convs and the classifier are never touched
            assert torch.equal(v, ref[k]), k


STEPS, BATCH = 4, 48


def test_paper_repair_end_to_end_matches_oracle():
    """Full ``repair(preset='paper')``: every reference default except a shorter unlearning
    run (the step count and batch are checked in ``test_paper_preset_values``)."""
    model = preact()
    names = oracle_layers(model)
    res = repair(model, preset="paper", detector=False, unlearn_steps=STEPS, unlearn_batch=BATCH, verify_samples=16,
                 device="cpu", input_size=(3, 32, 32))
    assert res.report.prune_ratio == 0.1 and res.report.layers_scored == len(names)

    unlearned = oracle_unlearn(model, steps=STEPS, batch=BATCH)
    w_bd = weights(model, names)
    nwc = oracle_nwc(w_bd, weights(unlearned, names))
    assert all(np.all(v > 0) for v in nwc)
    # the engine reports the same NWC (its summary holds per-layer mean and max)
    for n, v in zip(names, nwc):
        assert res.report.nwc["layers"][n]["max"] == pytest.approx(v.max(), rel=1e-6)
        assert res.report.nwc["layers"][n]["mean"] == pytest.approx(v.mean(), rel=1e-6)
    w_pn, idx = oracle_prune(w_bd, nwc, 0.1)
    assert res.report.neurons_pruned == sum(map(len, idx))
    assert res.report.pruned_per_layer == {n: len(i) for n, i in zip(names, idx) if i}
    expected = oracle_fuse(w_bd, w_pn, nwc, idx, 0.5)
    got = weights(res.model, names)
    for n, e, g in zip(names, expected, got):
        assert np.allclose(g, e, rtol=1e-5, atol=1e-6), n
    _assert_rest_untouched(model, res.model, names)
