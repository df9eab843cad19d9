"""Data-free detection on handcrafted models whose answer is known by construction."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from otbr_hub.detect import (
    DetectSettings,
    Detection,
    MarginResult,
    TriggerResult,
    decide,
    decide_trigger,
    detect,
    max_margin,
    outlier_p_value,
    robust_p_value,
    universal_trigger,
)
from otbr_hub.load import InputSpec

SIZE = 10
SPEC = InputSpec(channels=1, height=SIZE, width=SIZE, mean=(0.5,), std=(0.5,), num_classes=10)
CHECKER = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


class TemplateNet(nn.Module):
    """Nearest-template classifier: logit_k = -||x - T_k||^2 up to a term shared by all classes,
    i.e. a linear layer. Optionally a 3x3 checkerboard detector (a conv, max-pooled over
    positions) adds up to ``boost`` to one class when the pattern is present anywhere. It
    responds once the match score (9 for an exact match) passes ``threshold``: from a half
    match upwards by default, as a trained trigger neuron does, so the search gets a gradient
    towards it."""

    def __init__(self, templates: torch.Tensor, target: int | None = None, boost: float = 200.0, threshold: float = 4.0) -> None:
        super().__init__()
        k = templates.shape[0]
        flat = templates.reshape(k, -1)
        self.fc = nn.Linear(flat.shape[1], k)
        with torch.no_grad():
            self.fc.weight.copy_(2 * flat)
            self.fc.bias.copy_(-(flat**2).sum(1))
        self.target = target
        self.boost = boost
        if target is not None:
            self.detector = nn.Conv2d(1, 1, 3, bias=True)
            with torch.no_grad():  # inputs are normalised to [-1, 1]: the response is 9 on an exact match
                self.detector.weight.copy_((2 * CHECKER - 1).view(1, 1, 3, 3) / 5)
                self.detector.bias.fill_(-threshold / 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.flatten(1))
        if self.target is None:
            return logits
        fire = torch.relu(self.detector(x)).amax(dim=(1, 2, 3))
        onehot = torch.zeros(logits.shape[1], dtype=x.dtype, device=x.device)
        onehot[self.target] = self.boost
        return logits + fire[:, None] * onehot


def random_templates(k: int, seed: int, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, 1, size, size, generator=g) * 2 - 1


def symmetric_templates(k: int = 10, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """Templates that are cyclic shifts of one another by SIZE*SIZE/k pixels: every class poses
    the same optimisation problem up to a permutation of pixels, so all margins are equal in
    principle and only optimiser noise separates them."""
    base = random_templates(1, seed, size).flatten()
    shift = base.numel() // k
    return torch.stack([torch.roll(base, i * shift) for i in range(k)]).view(k, 1, size, size)


FAST = DetectSettings(inputs_per_class=4, steps=60, lr=0.1)
WIDE = DetectSettings(inputs_per_class=2, steps=40, max_classes=24, screen_top=6, screen_steps=10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: thread start-up costs more than it saves on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_handcrafted_backdoor_found_with_its_target() -> None:
    model = TemplateNet(random_templates(10, seed=1), target=6)
    det = detect(model, SPEC, FAST)
    assert det.verdict == "backdoored"
    assert det.suspected_target == 6
    # Three times every other margin: the Gamma p is ~0; the robust p is the calibrated one of
    # a z-score of 12 among ten classes (0.0035; the old Student-t tail said < 1e-4).
    assert det.p_value < 0.01 and det.p_gamma is not None and det.p_gamma < 1e-6
    assert det.statistics[6] > 2 * max(v for c, v in det.statistics.items() if c != 6)


def test_symmetric_model_is_not_flagged() -> None:
    """All classes are equal by construction. The margins differ by a few percent of optimiser
    noise; a Gamma fitted to such a tight cluster makes the luckiest class look significant
    (the published rule flags this model), the robust rule does not."""
    result = max_margin(TemplateNet(symmetric_templates()), SPEC, FAST)
    det = decide(result, FAST)
    assert det.verdict == "clean", det
    assert det.suspected_target is None
    assert decide(result, DetectSettings(method="mmbd", alpha_backdoored=0.05)).verdict == "backdoored"


def test_random_clean_model_is_not_flagged() -> None:
    det = detect(TemplateNet(random_templates(10, seed=2)), SPEC, FAST)
    assert det.verdict == "clean", det


def test_same_seed_same_result_and_other_seed_differs() -> None:
    model = TemplateNet(random_templates(10, seed=3))
    a = max_margin(model, SPEC, FAST)
    b = max_margin(model, SPEC, FAST)
    c = max_margin(model, SPEC, DetectSettings(inputs_per_class=4, steps=60, seed=1))
    assert a.margins == b.margins
    assert a.margins != c.margins


def test_chunking_does_not_change_margins() -> None:
    """A class's starting images depend only on (seed, class), not on how classes are batched."""
    model = TemplateNet(random_templates(10, seed=3))
    whole = max_margin(model, SPEC, FAST)
    chunked = max_margin(model, SPEC, DetectSettings(inputs_per_class=4, steps=60, max_batch=12))
    for c in range(10):
        assert chunked.margins[c] == pytest.approx(whole.margins[c], rel=1e-5)


def test_model_untouched() -> None:
    model = TemplateNet(random_templates(10, seed=4), target=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detect(model, SPEC, FAST)
    assert model.training, "training mode must be restored"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_thousand_classes_screened_within_budget() -> None:
    k = 1000
    spec = InputSpec(channels=1, height=SIZE, width=SIZE, mean=(0.5,), std=(0.5,), num_classes=k)
    model = TemplateNet(random_templates(k, seed=5), target=777)
    settings = WIDE
    t0 = time.perf_counter()
    det = detect(model, spec, settings)
    assert time.perf_counter() - t0 < 10
    assert det.screened
    assert det.screen_statistics is not None and len(det.screen_statistics) == k
    assert len(det.statistics) <= settings.screen_top + settings.sample_size()
    assert det.verdict == "backdoored" and det.suspected_target == 777


def test_thousand_clean_classes_not_flagged() -> None:
    k = 1000
    spec = InputSpec(channels=1, height=SIZE, width=SIZE, mean=(0.5,), std=(0.5,), num_classes=k)
    det = detect(TemplateNet(random_templates(k, seed=6)), spec, WIDE)
    assert det.verdict == "clean", det


def test_given_candidates_replace_the_margin_screen() -> None:
    """screen_steps=0: no per-class pass; the given candidates and the random sample are
    searched, and a backdoor among the candidates is found."""
    k = 1000
    spec = InputSpec(channels=1, height=SIZE, width=SIZE, mean=(0.5,), std=(0.5,), num_classes=k)
    model = TemplateNet(random_templates(k, seed=5), target=777)
    settings = dataclasses.replace(WIDE, screen_steps=0)
    seen: list[tuple[int, int | None]] = []
    result = max_margin(model, spec, settings, progress=lambda _s, done, total: seen.append((done, total)), candidates=[777, 3])
    assert result.screened and result.screen_margins == [] and {777, 3} <= set(result.margins)
    assert set(result.margins) == {777, 3} | set(result.null_classes)
    n_in, n_steps = settings.full_budget(True)
    assert seen[-1][0] == len(result.margins) * n_in * n_steps  # no screening passes
    det = decide(result, settings)
    assert det.verdict == "backdoored" and det.suspected_target == 777


class HeadShift(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> linear, with one classifier row made to collect
    the positive evidence a dirty-label target would (the BatchNorm's shift is positive)."""

    def __init__(self, k: int, favoured: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, k)
        with torch.no_grad():
            self.bn.bias.fill_(0.5)
            self.head.weight.mul_(0.1)
            self.head.weight[favoured] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_weight_evidence_chooses_the_searched_classes_above_max_classes() -> None:
    k = 200
    spec = InputSpec(channels=1, height=SIZE, width=SIZE, mean=(0.5,), std=(0.5,), num_classes=k)
    model = HeadShift(k, favoured=123).eval()
    cheap = DetectSettings(screened_inputs_per_class=1, screened_steps=5, max_classes=8, screen_top=2, screen_sample=6,
                           weight_evidence=False)
    det = detect(model, spec, cheap)
    assert 123 in det.statistics and len(det.statistics) <= cheap.screen_top + cheap.sample_size()
    assert det.weight_evidence is None  # it chose classes; it did not vote
    off = detect(model, spec, dataclasses.replace(cheap, evidence_screen=False, screen_steps=0))  # the sample alone
    assert set(off.statistics) <= set(det.statistics) and 123 not in off.statistics


def _result(margins: dict[int, float]) -> MarginResult:
    return MarginResult(margins=margins, null_classes=sorted(margins), num_classes=len(margins))


def test_decision_rules() -> None:
    """Hand-written margins: one clear outlier; and a tight cluster with a modest top, which
    the Gamma-only rule flags and the robust rule does not."""
    outlier = _result({c: 10.0 + c * 0.5 for c in range(9)} | {9: 60.0})
    det = decide(outlier)
    assert det.verdict == "backdoored" and det.suspected_target == 9

    tight = _result({0: 20.0, 1: 20.2, 2: 19.9, 3: 20.1, 4: 19.8, 5: 20.3, 6: 20.0, 7: 19.9, 8: 20.1, 9: 22.5})
    assert decide(tight, DetectSettings(method="mmbd")).verdict == "backdoored"
    robust = decide(tight)
    assert robust.verdict == "clean"
    assert robust.p_robust is not None and robust.p_value == max(robust.p_gamma, robust.p_robust)


def test_published_preset_and_json() -> None:
    s = DetectSettings.published()
    assert (s.inputs_per_class, s.steps, s.method, s.alpha_backdoored) == (30, 300, "mmbd", 0.05)
    out = decide(_result({c: 10.0 + c for c in range(10)})).to_dict()
    assert set(Detection.__dataclass_fields__) <= set(out)  # the JSON form keeps every field
    assert all(isinstance(k, str) for k in out["statistics"])


def test_bad_settings_rejected() -> None:
    with pytest.raises(ValueError):
        DetectSettings(alpha_backdoored=0.1, alpha_suspicious=0.05)
    with pytest.raises(ValueError):
        DetectSettings(method="nc")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DetectSettings(trigger_flip=0.0)


# --------------------------------------------------------------------------- universal-trigger search

# At 10x10 a nearest-template model is so easy to flip with a few pixels that a 3x3 trigger
# is not cheaper than natural class evidence; at 16x16 it is (natural masks need 20-55 pixels).
T_SIZE = 16
T_SPEC = InputSpec(channels=1, height=T_SIZE, width=T_SIZE, mean=(0.5,), std=(0.5,), num_classes=10)
TRIGGER = DetectSettings(method="trigger", trigger_steps=120)


def trigger_model(seed: int, target: int) -> TemplateNet:
    """Template model plus a checkerboard trigger neuron that already responds to a weak match
    (score above 0.5 of 9): the synthetic backgrounds are smooth and grey, where a neuron that
    needs a half match never fires and so gives the search no gradient."""
    return TemplateNet(random_templates(10, seed=seed, size=T_SIZE), target=target, threshold=0.5)


@pytest.mark.parametrize(("seed", "target"), [(1, 6), (4, 2)])
def test_trigger_search_finds_patch_backdoor(seed: int, target: int) -> None:
    det = detect(trigger_model(seed, target), T_SPEC, TRIGGER)
    assert det.method == "trigger" and det.p_gamma is None
    # A mask under half the smallest other among ten classes is p ~ 0.015-0.02 under the
    # calibrated null ('suspicious'); the old Student-t tail called it 'backdoored'.
    assert det.verdict != "clean" and det.p_value < 0.05, det
    assert det.suspected_target == target
    others = [v for c, v in det.statistics.items() if c != target]
    assert det.statistics[target] < 0.5 * min(others)


def test_trigger_search_leaves_symmetric_model_clean() -> None:
    det = detect(TemplateNet(symmetric_templates(size=T_SIZE)), T_SPEC, TRIGGER)
    assert det.verdict == "clean", det
    assert det.suspected_target is None


def test_trigger_search_deterministic_and_chunk_invariant() -> None:
    model = TemplateNet(random_templates(10, seed=3, size=T_SIZE))
    a = universal_trigger(model, T_SPEC, TRIGGER)
    b = universal_trigger(model, T_SPEC, TRIGGER)
    c = universal_trigger(model, T_SPEC, dataclasses.replace(TRIGGER, seed=1))
    assert a.costs == b.costs
    assert a.costs != c.costs
    chunked = universal_trigger(model, T_SPEC, dataclasses.replace(TRIGGER, max_batch=40))  # 2 classes per pass
    for k in range(10):
        assert chunked.costs[k] == pytest.approx(a.costs[k], rel=1e-3)


def test_trigger_search_leaves_model_untouched() -> None:
    model = trigger_model(4, 2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detect(model, T_SPEC, TRIGGER)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_trigger_search_screens_many_classes() -> None:
    k = 200
    spec = InputSpec(channels=1, height=T_SIZE, width=T_SIZE, mean=(0.5,), std=(0.5,), num_classes=k)
    model = TemplateNet(random_templates(k, seed=5, size=T_SIZE), target=123, threshold=0.5)
    settings = DetectSettings(method="trigger", max_classes=24, screen_top=6, trigger_steps=80)
    det = detect(model, spec, settings)
    assert det.screened and det.screen_statistics is not None and len(det.screen_statistics) == k
    assert len(det.statistics) <= settings.max_classes
    assert det.verdict != "clean" and det.suspected_target == 123, det


def _trigger_result(costs: dict[int, float]) -> TriggerResult:
    return TriggerResult(costs=costs, flip_rates={}, null_classes=sorted(costs), num_classes=len(costs), image_area=256)


def test_trigger_decision_rule() -> None:
    """One class needing a tenth of the others' mask is flagged; a spread-out set is not."""
    outlier = _trigger_result({c: 40.0 + 2 * c for c in range(9)} | {9: 4.0})
    det = decide_trigger(outlier)
    assert det.verdict == "backdoored" and det.suspected_target == 9 and det.robust_z is not None and det.robust_z > 2
    spread = _trigger_result({c: 10.0 * 1.3**c for c in range(10)})
    assert decide_trigger(spread).verdict == "clean"


# --------------------------------------------------------------------------- BatchNorm-moment evidence

from scipy import stats as _stats  # noqa: E402

from otbr_hub.evidence import WeightEvidence, combine, mean_features, weight_evidence  # noqa: E402

BN_SPEC = InputSpec(channels=1, height=8, width=8, mean=(0.5,), std=(0.5,), num_classes=10)


class BNNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> average pool -> linear, with chosen BatchNorm moments.

    Clean: every class row is a different permutation of the same weights (balanced classes,
    each reading its own mix of the features). ``target`` mimics what dirty-label poisoning
    does to the head: the target row also gets positive weight on every feature, since images
    of every class were labelled with it."""

    def __init__(self, seed: int, target: int | None = None, width: int = 64, extra: float = 1.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)
        with torch.no_grad():
            self.bn.weight.copy_(0.5 + torch.rand(width, generator=g))
            self.bn.bias.copy_(torch.randn(width, generator=g) * 0.5)
            base = torch.randn(width, generator=g)
            self.fc.weight.copy_(torch.stack([base[torch.randperm(width, generator=g)] for _ in range(10)]))
            self.fc.bias.zero_()
            if target is not None:
                self.fc.weight[target] += extra
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_mean_features_follow_the_batchnorm_moments() -> None:
    """Each pooled feature is relu(N(beta, gamma^2)) on average: the Gaussian's rectified mean."""
    model = BNNet(seed=0)
    mean_f, n_bn = mean_features(model, BN_SPEC, pixels=2**18)
    beta, gamma = model.bn.bias.detach().double(), model.bn.weight.detach().double()
    ratio = (beta / gamma).numpy()
    expected = beta.numpy() * _stats.norm.cdf(ratio) + gamma.numpy() * _stats.norm.pdf(ratio)
    assert n_bn == 1
    assert mean_f.numpy() == pytest.approx(expected, rel=0.02, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_weight_evidence_clean_rows_not_flagged(seed: int) -> None:
    ev = weight_evidence(BNNet(seed=seed), BN_SPEC, pixels=2**16)
    assert ev.applicable and ev.p_value is not None and len(ev.per_class) == 10
    assert ev.p_value > 0.05, ev


@pytest.mark.parametrize("seed,target", [(0, 4), (1, 9), (2, 0), (3, 5)])
def test_weight_evidence_names_a_dirty_label_target(seed: int, target: int) -> None:
    ev = weight_evidence(BNNet(seed=seed, target=target), BN_SPEC, pixels=2**16)
    assert ev.top_class == target
    assert ev.p_value is not None and ev.p_value < 0.01, ev


def test_weight_evidence_is_deterministic_and_leaves_the_model_alone() -> None:
    model = BNNet(seed=1, target=3)
    model.bn.train()  # a mixed mode state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = (weight_evidence(model, BN_SPEC, pixels=2**16) for _ in range(2))
    assert a.per_class == b.per_class
    assert model.bn.training and not model.conv.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics included
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_weight_evidence_does_not_depend_on_how_many_images_go_through_at_once(monkeypatch) -> None:
    """The noise is drawn per (seed, layer, image): a smaller memory budget (more chunks)
    gives the same numbers, as the margins do."""
    import otbr_hub.evidence as evidence

    model = BNNet(seed=2, target=7)
    whole = weight_evidence(model, BN_SPEC, pixels=2**14)
    monkeypatch.setattr(evidence, "images_per_pass", lambda *a, **k: 3)
    chunked = weight_evidence(model, BN_SPEC, pixels=2**14)
    assert chunked.per_class == pytest.approx(whole.per_class, rel=1e-9)
    assert weight_evidence(model, BN_SPEC, pixels=2**14, seed=1).per_class != whole.per_class


def test_models_without_batchnorm_are_judged_by_the_margins_alone() -> None:
    model = TemplateNet(random_templates(10, seed=1), target=6)
    ev = weight_evidence(model, SPEC)
    assert not ev.applicable and ev.reason
    with_ev = detect(model, SPEC, FAST)
    without = detect(model, SPEC, dataclasses.replace(FAST, weight_evidence=False))
    assert (with_ev.verdict, with_ev.p_value, with_ev.suspected_target) == (without.verdict, without.p_value, without.suspected_target)
    assert with_ev.decided_by == "margins" and with_ev.weight_evidence is not None


def test_combination_is_bonferroni_and_names_the_deciding_class() -> None:
    ev = WeightEvidence(applicable=True, top_class=4, p_value=0.001)
    c = combine(0.3, 8, ev)
    assert (c.p_value, c.target, c.source) == (pytest.approx(0.002), 4, "weights")
    c = combine(0.0004, 8, ev)
    assert (c.p_value, c.target, c.source) == (pytest.approx(0.0008), 8, "margins")
    assert combine(0.7, 2, WeightEvidence(applicable=False)).p_value == 0.7
    assert combine(0.9, 2, ev, first="triggers").p_value == pytest.approx(0.002)


def test_detect_flags_a_dirty_label_head_the_margins_miss() -> None:
    """The margins of this tiny net are unremarkable; the head's evidence decides, at half the
    level, and says 'suspicious' with a note however small its p-value: a label shift is also
    what a clean model trained on imbalanced labels shows."""
    model = BNNet(seed=2, target=0)
    det = detect(model, BN_SPEC, FAST)
    assert det.weight_evidence is not None and det.weight_evidence["applicable"]
    assert det.decided_by == "weights" and det.suspected_target == 0
    assert det.p_value == pytest.approx(2 * det.weight_evidence["p_value"])
    assert det.p_value < FAST.alpha_backdoored  # strong evidence, still only 'suspicious'
    assert det.verdict == "suspicious" and det.note and "imbalanced" in det.note
    assert det.p_first is not None and det.p_first > det.weight_evidence["p_value"]
    clean = detect(BNNet(seed=2), BN_SPEC, FAST)
    assert clean.verdict == "clean" and "imbalanced" not in (clean.note or ""), clean


def test_margins_still_make_backdoored_when_the_weights_are_smaller() -> None:
    """'backdoored' comes from the margins alone, at their whole level and with their own
    p-value (only they can give it), even when the weights' p-value is smaller and names
    another class; the same weights next to unremarkable margins give 'suspicious' with a note."""
    from otbr_hub.detect import MarginResult, _add_weight_evidence

    rng = np.random.default_rng(0)
    base = {c: float(np.exp(3 + 0.2 * rng.standard_normal())) for c in range(10)}
    strong = decide(MarginResult(margins={**base, 6: 1e6}, null_classes=list(range(10)), num_classes=10), FAST)
    assert strong.verdict == "backdoored"
    p_margins = strong.p_value
    _add_weight_evidence(strong, WeightEvidence(applicable=True, top_class=2, p_value=p_margins / 10), FAST)
    assert (strong.verdict, strong.suspected_target, strong.decided_by) == ("backdoored", 6, "margins")
    assert strong.p_value == p_margins and strong.note is None

    # the same margin p-value gives the same verdict with or without applicable weight evidence
    edge = decide(MarginResult(margins={**base, 6: 1e6}, null_classes=list(range(10)), num_classes=10), FAST)
    edge.p_value = 0.008  # between alpha_backdoored / 2 and alpha_backdoored
    _add_weight_evidence(edge, WeightEvidence(applicable=True, top_class=6, p_value=0.5), FAST)
    assert (edge.verdict, edge.p_value) == ("backdoored", 0.008)

    plain = decide(MarginResult(margins=base, null_classes=list(range(10)), num_classes=10), FAST)
    assert plain.verdict == "clean"
    _add_weight_evidence(plain, WeightEvidence(applicable=True, top_class=2, p_value=1e-6), FAST)
    assert (plain.verdict, plain.suspected_target, plain.decided_by) == ("suspicious", 2, "weights")
    assert plain.p_value == pytest.approx(2e-6) and "label shift towards class 2" in plain.note


def test_outlier_p_value_is_calibrated_under_a_gaussian_null() -> None:
    """Uniform p-values when all classes are i.i.d. Gaussian (the draws here are independent of
    the seeded null sample). The margins' median/MAD form is checked further below."""
    from otbr_hub.evidence import max_outlier_p_value

    rng = torch.Generator().manual_seed(99)
    x = torch.randn(4000, 10, generator=rng).double()
    top = x.max(1).values
    rest = torch.sort(x, 1).values[:, :-1]
    z = (top - rest.mean(1)) / rest.std(1)
    p = torch.tensor([max_outlier_p_value(float(v), 10) for v in z])
    assert abs(float((p < 0.05).double().mean()) - 0.05) < 0.012
    assert abs(float((p < 0.2).double().mean()) - 0.2) < 0.025
    assert max_outlier_p_value(50.0, 10) == pytest.approx(1 / 20001)


class LNHeadNet(nn.Module):
    """conv -> average pool -> LayerNorm -> linear (a ConvNeXt/ViT-style head), rows as in BNNet.

    With no BatchNorm the mean feature is the head norm's bias; nothing runs forward."""

    def __init__(self, seed: int, target: int | None = None, width: int = 256, extra: float = 1.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 10)
        with torch.no_grad():
            self.norm.bias.copy_(torch.randn(width, generator=g) * 0.5)
            base = torch.randn(width, generator=g)
            self.fc.weight.copy_(torch.stack([base[torch.randperm(width, generator=g)] for _ in range(10)]))
            if target is not None:
                self.fc.weight[target] += extra * torch.sign(self.norm.bias)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x).mean((2, 3))))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_layernorm_head_evidence(seed: int) -> None:
    clean = weight_evidence(LNHeadNet(seed), BN_SPEC)
    assert clean.applicable and clean.source == "head-norm-bias" and clean.batchnorms == 0
    assert clean.p_value is not None and clean.p_value > 0.05, clean
    bad = weight_evidence(LNHeadNet(seed, target=7 - seed), BN_SPEC)
    assert bad.top_class == 7 - seed and bad.p_value is not None and bad.p_value < 0.01, bad


# --------------------------------------------------------------------------- calibration of the margin test


def _null_margins(rng: np.random.Generator, k: int, sd: float) -> np.ndarray:
    """Margins of k exchangeable clean classes: i.i.d. Gaussian in log, median margin 50."""
    return np.exp(math.log(50.0) + sd * rng.standard_normal(k))


def _binomial_slack(p: float, n: int) -> float:
    return 3.5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("k", [10, 64])
@pytest.mark.parametrize("test", [outlier_p_value, robust_p_value], ids=["sd", "mad"])
def test_margin_outlier_p_values_are_calibrated_under_a_gaussian_null(k: int, test) -> None:
    """With the spread floor out of play (sd 1), both outlier p-values (mean/sd, the default,
    and median/MAD) have their nominal rate under K i.i.d. Gaussian log-margins (draws
    independent of the seeded null sample). The Student-t tail they replaced gave 6.8 % below
    0.01 and 16 % below 0.05 at K = 10."""
    rng = np.random.default_rng(2026)
    n = 3000
    ps = []
    for _ in range(n):
        m = np.sort(_null_margins(rng, k, 1.0))
        ps.append(test(float(m[-1]), m[:-1], k, min_spread=0.1)[0])
    p = np.asarray(ps)
    for a in (0.01, 0.05, 0.2):
        assert abs(float((p < a).mean()) - a) < _binomial_slack(a, n), (a, float((p < a).mean()))


@pytest.mark.parametrize("test", [outlier_p_value, robust_p_value], ids=["sd", "mad"])
def test_margin_outlier_p_values_are_calibrated_after_screening(test) -> None:
    """K = 1000 classes, the top of all of them against a random sample of 48 (as after
    screening): the null uses the maximum of K, not of the sample."""
    rng = np.random.default_rng(7)
    n, k = 2000, 1000
    ps = []
    for _ in range(n):
        m = _null_margins(rng, k, 1.0)
        top = int(np.argmax(m))
        sample = [c for c in rng.choice(k, size=48, replace=False) if c != top]
        ps.append(test(float(m[top]), m[sample], k, min_spread=0.1)[0])
    p = np.asarray(ps)
    for a in (0.01, 0.05):
        assert abs(float((p < a).mean()) - a) < _binomial_slack(a, n), (a, float((p < a).mean()))


def test_default_decision_does_not_exceed_its_level_on_clean_nulls() -> None:
    """decide() at the default settings (floor 0.1, max with the Gamma p) on ten i.i.d.
    Gaussian log-margins with the zoo's typical spread (sd 0.3): the floor and the
    intersection with the Gamma test only make it more conservative."""
    rng = np.random.default_rng(11)
    n = 1500
    ps = np.array([decide(_result(dict(enumerate(_null_margins(rng, 10, 0.3).tolist())))).p_value for _ in range(n)])
    for a in (0.01, 0.05):
        assert float((ps < a).mean()) < a + _binomial_slack(a, n), (a, float((ps < a).mean()))


def test_mean_sd_margin_test_sees_a_tenfold_margin_that_the_mad_form_misses() -> None:
    """The margins the scan tests' handcrafted trigger model reached at their budget (target
    3 about 10x the others): the default mean/sd form says 'backdoored' even at half the level
    (as when the weight evidence is also tested), the median/MAD form of nine values does not
    (its null is very heavy-tailed at ten classes)."""
    margins = {0: 12.5, 1: 12.5, 2: 13.3, 3: 132.3, 4: 8.5, 5: 15.5, 6: 8.8, 7: 8.4, 8: 11.8, 9: 7.7}
    result = MarginResult(margins=margins, null_classes=list(range(10)), num_classes=10)
    sd = decide(result, DetectSettings())
    mad = decide(result, DetectSettings(margin_scale="mad"))
    assert sd.verdict == "backdoored" and sd.suspected_target == 3 and sd.p_value < 0.005
    assert mad.p_value > 0.01 and mad.verdict != "backdoored"
    with pytest.raises(ValueError, match="margin_scale"):
        DetectSettings(margin_scale="iqr")  # type: ignore[arg-type]


# ----- detection review (session 15) ---------------------------------------------------------------------------


def test_near_equal_margins_give_no_evidence_instead_of_a_failed_fit_or_p_zero() -> None:
    from otbr_hub.detect import gamma_p_value

    assert gamma_p_value(16.000002, np.array([16.0] * 8 + [16.0000001]), 10) == 1.0  # was p = 0: 'backdoored'
    rng = np.random.default_rng(0)
    for _ in range(50):  # clustered margins of a model that outputs saturated probabilities
        null = 1.0 - rng.uniform(0, 1e-6, 9)
        p = gamma_p_value(1.0, null, 10)
        assert 0.0 <= p <= 1.0


def test_large_seeds_the_settings_accept_work_end_to_end() -> None:
    from tiny import tiny_timm

    spec = InputSpec(channels=1, height=28, width=28, mean=(0.286,), std=(0.353,), num_classes=10)
    for seed in (20261201, 2**63 - 1):
        det = detect(tiny_timm(), spec, DetectSettings(seed=seed, steps=2, inputs_per_class=1, device="cpu"))
        assert det.verdict in ("clean", "suspicious", "backdoored")


def test_margins_that_say_nothing_are_noted_not_silently_clean() -> None:
    broken = decide(MarginResult(margins={**{c: 1.0 + 0.1 * c for c in range(9)}, 9: float("nan")},
                                 null_classes=list(range(10)), num_classes=10), FAST)
    assert "no finite margin for class 9" in (broken.note or "")
    lonely = decide(MarginResult(margins={0: 500.0, 1: 2.0, 2: 1.5, **{c: -0.5 for c in range(3, 10)}},
                                 null_classes=list(range(10)), num_classes=10), FAST)
    assert lonely.verdict == "clean" and "too few to test class 0" in (lonely.note or "")
    plain = decide(MarginResult(margins={c: 1.0 + 0.1 * c for c in range(10)}, null_classes=list(range(10)), num_classes=10), FAST)
    assert plain.note is None


def test_repair_counts_the_margins_as_flagging_at_the_level_the_scan_does(monkeypatch) -> None:
    """Margins at p 0.03 with the weight evidence at 0.001: the scan says the weights flagged
    (the margins count at half the 0.05 level), so repair must not walk the ratios by the margins."""
    import otbr_hub.detect as detect_mod
    from otbr_hub import repair
    from otbr_hub.load import from_model
    from tiny import tiny_timm

    base = decide(MarginResult(margins={c: 1.0 + 0.1 * c for c in range(10)}, null_classes=list(range(10)), num_classes=10))
    crafted = dataclasses.replace(base, verdict="suspicious", p_value=0.002, p_first=0.03, decided_by="weights",
                                  suspected_target=2, weight_evidence={"applicable": True, "p_value": 0.001, "top_class": 2})
    calls: list[int] = []
    monkeypatch.setattr(detect_mod, "detect", lambda *a, **k: calls.append(1) or crafted)
    report = repair(from_model(tiny_timm(), input_size=(1, 28, 28)), unlearn_steps=1, unlearn_batch=8, verify_samples=4,
                    device="cpu").report
    assert "weight evidence only" in report.ratio_reason and len(calls) == 1  # no ratio walk
