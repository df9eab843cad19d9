"""Triggers, evaluation data and metrics. Fast: no training, only handcrafted or random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import datasets
from otbr_hub.data import (
    FASHION_MNIST_ROOT,
    fashion_mnist,
    fashion_mnist_tensors,
    find_columns,
    load_eval_dataset,
    to_tensors,
)
from otbr_hub.errors import UsageError
from otbr_hub.evaluate import EvalResult, der, evaluate
from otbr_hub.load import InputSpec
from otbr_hub.triggers import TRIGGERS, Trigger, parse_trigger

HAS_FMNIST = (FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").is_file()


# --------------------------------------------------------------------------- triggers


def test_parse_trigger_defaults_and_round_trip() -> None:
    t = parse_trigger("badnets:target=3,size=4,pos=tl")
    assert (t.name, t.target, t.params["size"], t.params["pos"], t.params["value"]) == ("badnets", 3, 4, "tl", 1.0)
    assert parse_trigger(t.spec()) == t
    assert Trigger.from_dict(t.to_dict()) == t
    assert parse_trigger(t.to_dict()) == t and parse_trigger(t) is t
    assert parse_trigger("blended").target == 0
    assert parse_trigger(" WaNet : s=0.5 ").params["s"] == 0.5


def test_parse_trigger_unknown_name_lists_known() -> None:
    with pytest.raises(UsageError) as err:
        parse_trigger("trojannn:target=1")
    for name in TRIGGERS:
        assert name in str(err.value)


def test_parse_trigger_unknown_parameter_lists_known() -> None:
    with pytest.raises(UsageError) as err:
        parse_trigger("badnets:target=1,colour=red")
    msg = str(err.value)
    assert "colour" in msg and "size" in msg and "target" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "spec",
    ["badnets:size=abc", "badnets:size=0", "badnets:pos=middle", "blended:alpha=1.5", "sig:target=x", "wanet:k", "badnets:target=-1"],
)
def test_parse_trigger_bad_values(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_trigger(spec)


def test_trigger_constructor_checks_parameters() -> None:
    with pytest.raises(UsageError):
        Trigger("blended", 0, {"beta": 0.1})


@pytest.mark.parametrize("name", list(TRIGGERS))
@pytest.mark.parametrize("channels", [1, 3])
def test_trigger_shapes_range_and_determinism(name: str, channels: int) -> None:
    x = torch.rand(5, channels, 20, 24, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    t = Trigger(name, 1)
    a, b = t.apply(x), Trigger(name, 1).apply(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert torch.equal(x, before), "apply must not modify its input"
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, x)


def test_seed_changes_random_patterns() -> None:
    x = torch.rand(2, 1, 16, 16)
    for name in ("blended", "wanet", "lowfreq"):
        assert not torch.equal(Trigger(name, 0, {"seed": 0}).apply(x), Trigger(name, 0, {"seed": 1}).apply(x))


def test_badnets_patch_position() -> None:
    x = torch.zeros(1, 1, 10, 10)
    out = parse_trigger("badnets:size=3,pos=br,margin=1,value=0.5").apply(x)
    assert out[0, 0, 6:9, 6:9].eq(0.5).all()
    assert out.sum().item() == pytest.approx(9 * 0.5)
    checker = parse_trigger("badnets:size=2,pos=tl,margin=0,pattern=checker").apply(x)
    assert checker[0, 0, :2, :2].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_wanet_noise_mode_and_sig_clean_label() -> None:
    x = torch.rand(4, 1, 16, 16)
    t = parse_trigger("wanet")
    noisy = t.apply_noise(x, torch.Generator().manual_seed(0))
    assert noisy.shape == x.shape and not torch.equal(noisy, t.apply(x))
    assert parse_trigger("sig").clean_label and not parse_trigger("badnets").clean_label
    with pytest.raises(UsageError):
        parse_trigger("badnets").apply_noise(x)


# --------------------------------------------------------------------------- data

SPEC32 = InputSpec(channels=1, height=32, width=32, mean=(0.5,), std=(0.5,), num_classes=10)


def _image_dataset(n: int = 6, size: int = 28, image_col: str = "image", label_col: str | None = "label", classes: int = 10):
    rng = np.random.default_rng(0)
    data: dict = {image_col: [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]}
    features = {image_col: datasets.Image()}
    if label_col is not None:
        data[label_col] = [i % classes for i in range(n)]
        features[label_col] = datasets.ClassLabel(num_classes=classes)
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def test_to_tensors_pads_small_images() -> None:
    ds = _image_dataset()
    x, y = to_tensors(ds, SPEC32)
    assert x.shape == (6, 1, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 3, 4, 5] and y.dtype == torch.long
    assert x[:, :, :2].abs().sum() == 0 and x[:, :, :, -2:].abs().sum() == 0
    raw = np.asarray(ds[0]["image"], dtype=np.float32) / 255
    assert torch.allclose(x[0, 0, 2:30, 2:30], torch.from_numpy(raw))


def test_to_tensors_resizes_channels_and_limit() -> None:
    spec = InputSpec(channels=3, height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
    x, y = to_tensors(_image_dataset(n=8, size=40, image_col="img", label_col="fine_label"), spec, limit=5)
    assert x.shape == (5, 3, 16, 16) and y.shape == (5,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x[:, 0], x[:, 1])


def test_missing_columns_raise_usage_error() -> None:
    with pytest.raises(UsageError, match="no label column"):
        to_tensors(_image_dataset(label_col=None), SPEC32)
    no_image = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(UsageError, match="no image column"):
        find_columns(no_image)


def test_load_eval_dataset_from_disk(tmp_path) -> None:
    ds = _image_dataset()
    datasets.DatasetDict({"test": ds, "train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_eval_dataset(tmp_path / "dd", "test")) == 6
    with pytest.raises(UsageError, match="no split"):
        load_eval_dataset(tmp_path / "dd", "validation")
    ds.save_to_disk(str(tmp_path / "single"))
    assert len(load_eval_dataset(str(tmp_path / "single"), "test")) == 6


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST idx files not installed")
def test_fashion_mnist_dataset_matches_fast_path() -> None:
    ds = fashion_mnist("test")
    assert len(ds) == 10_000
    assert ds.features["label"].names[0] == "T-shirt/top" and ds.features["label"].num_classes == 10
    x_slow, y_slow = to_tensors(ds, SPEC32, limit=40, seed=3)
    x_fast, y_fast = fashion_mnist_tensors("test", SPEC32, limit=40, seed=3)
    assert torch.equal(y_slow, y_fast)
    assert torch.allclose(x_slow, x_fast)
    with pytest.raises(UsageError):
        fashion_mnist("validation")


# --------------------------------------------------------------------------- evaluate


class PatchOracle(nn.Module):
    """Reads the label from pixel (0, 0) (value label / 10) and is backdoored on even classes.

    Clean: correct except class 9, which it calls 8 -> ACC 90 %. With the badnets patch
    (bottom-right 2x2 of ones) even classes go to the target; odd ones keep the clean answer.
    """

    def __init__(self, spec: InputSpec, target: int) -> None:
        super().__init__()
        self.spec, self.target = spec, target
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.spec.std[0] + self.spec.mean[0]  # undo normalisation: checks evaluate applies it
        label = (pixels[:, 0, 0, 0] * 10).round().long()
        pred = torch.where(label == 9, torch.full_like(label, 8), label)
        patched = pixels[:, 0, -2:, -2:].reshape(len(x), -1).gt(0.99).all(dim=1)
        pred = torch.where(patched & (label % 2 == 0), torch.full_like(label, self.target), pred)
        return nn.functional.one_hot(pred, 10).float() + self.dummy


def _oracle_data() -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(10).repeat(10)
    x = torch.full((100, 1, 8, 8), 0.3)
    x[:, 0, 0, 0] = y.float() / 10
    return x, y


def test_evaluate_exact_numbers() -> None:
    spec = InputSpec(channels=1, height=8, width=8, mean=(0.4,), std=(0.2,), num_classes=10)
    model = PatchOracle(spec, target=3).train()
    trigger = parse_trigger("badnets:target=3,size=2,margin=0")
    res = evaluate(model, spec, _oracle_data(), trigger, batch_size=7)
    assert res.n_clean == 100 and res.n_triggered == 90
    assert res.acc == pytest.approx(90.0)
    assert res.asr == pytest.approx(100 * 50 / 90, abs=1e-4)  # classes 0, 2, 4, 6, 8
    assert res.ra == pytest.approx(100 * 30 / 90, abs=1e-4)  # classes 1, 5, 7 (9 is called 8)
    assert model.training, "evaluate must restore the model's mode"
    clean_only = evaluate(model, spec, _oracle_data(), None)
    assert clean_only.asr is None and clean_only.acc == pytest.approx(90.0)
    assert evaluate(model, spec, _oracle_data(), trigger, limit=10).n_clean == 10


def test_evaluate_on_dataset_and_random_timm_like_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    res = evaluate(model, SPEC32, _image_dataset(n=20), parse_trigger("blended:target=2"))
    assert res.n_clean == 20 and res.n_triggered == 18
    assert 0 <= res.acc <= 100 and 0 <= res.asr <= 100 and 0 <= res.ra <= 100


def test_label_set_mismatch() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
    with pytest.raises(UsageError, match="classes"):
        evaluate(model, SPEC32, _image_dataset(classes=5), None)
    x = torch.rand(4, 1, 32, 32)
    with pytest.raises(UsageError, match="classes"):
        evaluate(model, SPEC32, (x, torch.tensor([0, 1, 2, 12])), None)
    with pytest.raises(UsageError, match="target"):
        evaluate(model, SPEC32, (x, torch.tensor([0, 1, 2, 3])), parse_trigger("badnets:target=10"))
    with pytest.raises(UsageError, match="shape"):
        evaluate(model, SPEC32, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])), None)


def test_der_formula() -> None:
    before = EvalResult(acc=90.0, asr=100.0, ra=0.0, n_clean=10, n_triggered=9)
    after = EvalResult(acc=85.0, asr=2.0, ra=80.0, n_clean=10, n_triggered=9)
    assert der(before, after) == pytest.approx((98 - 5 + 100) / 2)
    better = EvalResult(acc=95.0, asr=100.0, ra=0.0, n_clean=10, n_triggered=9)
    assert der(before, better) == pytest.approx(50.0)  # neither gain is rewarded
    assert der(before, before) == pytest.approx(50.0)
    with pytest.raises(UsageError):
        der(before, EvalResult(acc=1.0, asr=None, ra=None, n_clean=1, n_triggered=0))


def test_the_early_check_reads_the_rows_evaluate_reads() -> None:
    """check_evaluation (run before a repair) sees exactly the labels evaluate() will use: a
    stray label outside the --eval-limit subset is no reason to refuse the run."""
    from otbr_hub.data import subset_indices
    from otbr_hub.evaluate import check_evaluation

    spec = InputSpec(channels=1, height=8, width=8, mean=(0.5,), std=(0.5,), num_classes=10)
    chosen = set(subset_indices(6, 3).tolist())
    stray = next(i for i in range(6) if i not in chosen)
    labels = [1] * 6
    labels[stray] = 10
    ds = datasets.Dataset.from_dict({"image": [np.zeros((8, 8), dtype=np.uint8)] * 6, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    check_evaluation(spec, ds, parse_trigger("badnets:target=2"), limit=3)
    assert evaluate(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), spec, ds, None, limit=3).n_clean == 3
    with pytest.raises(UsageError, match=r"labels span 1\.\.10 but the model has 10 classes"):
        check_evaluation(spec, ds, None)
    with pytest.raises(UsageError, match="trigger target 10"):
        check_evaluation(spec, ds, parse_trigger("badnets:target=10"), limit=3)
    strings = datasets.Dataset.from_dict({"image": [np.zeros((8, 8), dtype=np.uint8)] * 2, "label": ["a", "b"]})
    with pytest.raises(UsageError, match="label column 'label' does not hold integer class ids"):
        check_evaluation(spec, strings, None)


# --------------------------------------------------------------------------- review: numbers that would have been wrong


def test_images_far_smaller_than_the_input_are_resized_not_padded() -> None:
    """A 28 px image on a 224 px model in the middle of a black canvas measures nothing; a
    28 px image on a 32 px model keeps its pixels and gets a border (as the zoo trained)."""
    spec = InputSpec(channels=3, height=224, width=224, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
    x, _ = to_tensors(_image_dataset(n=2), spec)
    assert x.shape == (2, 3, 224, 224) and float(x[:, :, :20].abs().sum()) > 0  # no black border
    x32, _ = to_tensors(_image_dataset(n=2), SPEC32)
    assert x32[:, :, :2].abs().sum() == 0


def test_class_names_in_another_order_are_refused() -> None:
    from otbr_hub.evaluate import check_evaluation

    names = [f"c{i}" for i in range(10)]
    ds = _image_dataset(n=10).cast_column("label", datasets.ClassLabel(names=names[::-1]))
    with pytest.raises(UsageError, match="in another order"):
        check_evaluation(SPEC32, ds, None, class_names=names)
    check_evaluation(SPEC32, ds, None, class_names=names[::-1])  # the same order: fine
    check_evaluation(SPEC32, ds, None, class_names=None)  # a model without names: nothing to compare


def test_fractional_labels_are_refused_not_truncated() -> None:
    from otbr_hub.evaluate import check_evaluation

    images = _image_dataset(n=3)["image"]
    halves = datasets.Dataset.from_dict({"image": images, "label": [0.5, 1.5, 2.5]})
    with pytest.raises(UsageError, match="does not hold integer class ids"):
        check_evaluation(SPEC32, halves, None)
    with pytest.raises(UsageError, match="does not hold integer class ids"):
        to_tensors(halves, SPEC32)
    whole = datasets.Dataset.from_dict({"image": images, "label": [0.0, 1.0, 2.0]})  # floats that are class ids
    check_evaluation(SPEC32, whole, None)
    assert to_tensors(whole, SPEC32)[1].tolist() == [0, 1, 2]


def test_a_missing_image_anywhere_is_refused_before_the_repair() -> None:
    from otbr_hub.evaluate import check_evaluation

    images = list(_image_dataset(n=4)["image"])
    images[3] = None
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    with pytest.raises(UsageError, match=r"1 of the 4 evaluation images are missing"):
        check_evaluation(SPEC32, ds, None)


def test_an_unreachable_hub_dataset_s_retries_go_to_the_log(caplog) -> None:
    """huggingface_hub's retry warnings would print a dozen lines before the one error."""
    import logging

    from otbr_hub.data import _retries_to_log

    hub_http = logging.getLogger("huggingface_hub.utils._http")
    # levels set here (the handler's too: at_level sets it): an earlier quiet CLI run in the same
    # process leaves the client's logger at ERROR
    with caplog.at_level(logging.WARNING, logger="huggingface_hub.utils._http"), \
            caplog.at_level(logging.INFO, logger="otbr_hub.data"), _retries_to_log():
        hub_http.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://x\nRetrying in 1s [Retry 1/5].")
    assert [r.name for r in caplog.records] == ["otbr_hub.data"]
    assert caplog.records[0].levelno == logging.INFO and "thrown while requesting HEAD" in caplog.records[0].getMessage()


def test_a_timm_folder_s_class_names_are_compared_with_the_dataset_s() -> None:
    """timm's save_pretrained writes label_names at the top of config.json, not in
    pretrained_cfg: a dataset in another class order must still be caught."""
    from pathlib import Path

    from otbr_hub.evaluate import check_evaluation
    from otbr_hub.load import class_names, load_folder

    loaded = load_folder(Path(__file__).resolve().parents[1] / "examples" / "badnets-resnet")
    names = class_names(loaded.model)
    assert names is not None and names[0] == "T-shirt/top" and len(names) == 10
    ds = _image_dataset(n=10).cast_column("label", datasets.ClassLabel(names=names[::-1]))
    with pytest.raises(UsageError, match="in another order"):
        check_evaluation(loaded.spec, ds, None, class_names=names)


def test_nothing_to_measure_and_undecodable_images_are_refused_up_front() -> None:
    from otbr_hub.evaluate import check_evaluation

    trigger = parse_trigger("badnets:target=3")
    only_target = datasets.Dataset.from_dict({"image": _image_dataset(n=2)["image"], "label": [3, 3]})
    with pytest.raises(UsageError, match="no image to measure the attack success rate on"):
        check_evaluation(SPEC32, only_target, trigger)
    with pytest.raises(UsageError, match="empty"):
        check_evaluation(SPEC32, (torch.empty(0, 1, 32, 32), torch.empty(0, dtype=torch.long)), None)
    paths = datasets.Dataset.from_dict({"image": ["a.png", "b.png"], "label": [0, 1]})
    with pytest.raises(UsageError, match="file paths"):
        check_evaluation(SPEC32, paths, None)
    grey_alpha = datasets.Dataset.from_dict({"image": [np.zeros((28, 28, 2), np.uint8)] * 2, "label": [0, 1]})
    x, _ = to_tensors(grey_alpha, SPEC32)
    assert x.shape == (2, 1, 32, 32)


def test_trigger_values_must_be_finite_and_given_once() -> None:
    for spec, words in (("badnets:size=inf", "finite"), ("sig:f=inf", "finite"), ("badnets:target=3,target=5", "twice")):
        with pytest.raises(UsageError, match=words):
            parse_trigger(spec)
    with pytest.raises(UsageError, match="integer class id"):
        parse_trigger({"name": "badnets", "target": 3.9})


def test_a_tensor_limit_is_the_same_seeded_subset_as_for_a_dataset() -> None:
    """Class-sorted tensors cut to their first N would hold one class only."""
    spec = InputSpec(channels=1, height=8, width=8, mean=(0.0,), std=(1.0,), num_classes=10)
    y = torch.arange(10).repeat_interleave(20)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    res = evaluate(model, spec, (torch.rand(200, 1, 8, 8), y), None, limit=50)
    assert res.n_clean == 50
    from otbr_hub.data import subset_indices

    assert len(set(y[subset_indices(200, 50)].tolist())) > 5


def test_a_processor_that_does_not_normalise_gives_unit_normalisation() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tiny_vit

    from otbr_hub.load import input_spec

    cfg = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_normalize": False, "size": {"height": 32, "width": 32}}
    spec = input_spec(tiny_vit(), processor_config=cfg)
    assert spec.mean == (0.0,) * 3 and spec.std == (1.0,) * 3
    assert input_spec(tiny_vit(), processor_config={**cfg, "do_normalize": True}).mean == (0.5,) * 3


def test_class_order_is_checked_on_names_spelt_differently_and_on_partial_overlaps() -> None:
    """The Hub's Fashion-MNIST spells its first class 'T - shirt / top'; reversed, with that
    one name spelt so, the order check must still fire (it compared equal sets only)."""
    from otbr_hub.evaluate import check_evaluation

    model = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    hub = ["T - shirt / top", *model[1:]]
    ds = _image_dataset(n=10).cast_column("label", datasets.ClassLabel(names=hub[::-1]))
    with pytest.raises(UsageError, match="'T-shirt/top' is class 9 in the dataset, 0 in the model"):
        check_evaluation(SPEC32, ds, None, class_names=model)
    check_evaluation(SPEC32, _image_dataset(n=10).cast_column("label", datasets.ClassLabel(names=hub)), None,
                     class_names=model)  # same order, other spelling: fine
    partial = [*model[:5], "a", "b", "c", "d", "e"][::-1]
    with pytest.raises(UsageError, match="another order"):
        check_evaluation(SPEC32, _image_dataset(n=10).cast_column("label", datasets.ClassLabel(names=partial)), None,
                         class_names=model)


def test_pixel_arrays_are_read_by_their_range() -> None:
    from PIL import Image

    from otbr_hub.data import _to_chw

    assert float(_to_chw(np.full((8, 8), 65535, np.uint16), 1).max()) == 1.0
    assert float(_to_chw(np.full((8, 8), 32768, np.uint16), 1).mean()) == pytest.approx(0.5, abs=1e-3)
    sixteen = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert float(_to_chw(sixteen, 1).mean()) == pytest.approx(0.5, abs=1e-3)  # PIL's convert('L') clipped it to 1.0
    assert float(_to_chw(Image.fromarray(np.full((8, 8), 0.5, np.float32)), 3).mean()) == pytest.approx(0.5)
    assert float(_to_chw(np.full((8, 8), 128, np.uint8), 1).mean()) == pytest.approx(128 / 255)
    with pytest.raises(UsageError, match="negative values"):  # pixel_values normalised for a model already
        _to_chw(np.full((3, 8, 8), -0.5, np.float32), 3)
    ds = datasets.Dataset.from_dict({"pixel_values": [np.full((1, 8, 8), -1.0, np.float32).tolist()], "label": [0]})
    spec = InputSpec(channels=1, height=8, width=8, mean=(0.5,), std=(0.5,), num_classes=10)
    with pytest.raises(UsageError, match="negative values"):
        to_tensors(ds, spec)
    with pytest.raises(UsageError, match="float pixels"):
        evaluate(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), spec,
                 (torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), torch.arange(4)), None)


def test_columns_prefer_usual_names_and_class_labels() -> None:
    mask = _image_dataset(n=2)
    both = datasets.Dataset.from_dict(
        {"mask": mask["image"], "image": mask["image"], "label": [0, 1]},
        features=datasets.Features({"mask": datasets.Image(), "image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}))
    assert find_columns(both) == ("image", "label")
    named = datasets.Dataset.from_dict(
        {"image": mask["image"], "class": ["x", "y"], "category": [0, 1]},
        features=datasets.Features({"image": datasets.Image(), "class": datasets.Value("string"),
                                    "category": datasets.ClassLabel(num_classes=10)}))
    assert find_columns(named) == ("image", "category")


def test_a_local_folder_named_like_the_fashion_mnist_alias_is_the_users_data(tmp_path, monkeypatch) -> None:
    _image_dataset(n=3).save_to_disk(str(tmp_path / "fmnist"))
    monkeypatch.chdir(tmp_path)
    assert len(load_eval_dataset("fmnist")) == 3


def test_a_dataset_is_measured_chunk_by_chunk_with_the_same_numbers(monkeypatch) -> None:
    import otbr_hub.evaluate as ev

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10)).eval()
    ds = _image_dataset(n=23)
    trigger = parse_trigger("badnets:target=3")
    whole = evaluate(model, SPEC32, ds, trigger)
    monkeypatch.setattr(ev, "DECODE_CHUNK", 5)
    decoded: list[int] = []
    import otbr_hub.data as data_mod

    original = data_mod.to_tensors
    monkeypatch.setattr(data_mod, "to_tensors", lambda rows, spec, **kw: decoded.append(len(rows)) or original(rows, spec, **kw))
    chunked = evaluate(model, SPEC32, ds, trigger)
    assert max(decoded) == 5 and sum(decoded[1:]) == 23  # the first call is check_evaluation's one-row decode
    assert (chunked.acc, chunked.asr, chunked.ra, chunked.n_clean, chunked.n_triggered) == \
        (whole.acc, whole.asr, whole.ra, whole.n_clean, whole.n_triggered)
    x, y = to_tensors(ds, SPEC32)
    assert evaluate(model, SPEC32, (x, y), trigger).acc == pytest.approx(whole.acc)


def test_only_a_border_of_a_few_pixels_is_padded() -> None:
    """28 -> 32 px is padded (the zoo's convention); a 200 px image for a 224 px model is
    resized, as its image processor would, not framed in 12 px of black."""
    spec = InputSpec(channels=1, height=224, width=224, mean=(0.5,), std=(0.5,), num_classes=10)
    x, _ = to_tensors(_image_dataset(n=1, size=200), spec)
    assert float(x[0, 0, :12].abs().sum()) > 0  # no black band at the top
    x32, _ = to_tensors(_image_dataset(n=1, size=28), SPEC32)
    assert x32[:, :, :2].abs().sum() == 0


def test_dark_16_bit_images_are_scaled_by_their_dtype() -> None:
    from otbr_hub.data import _to_chw

    assert float(_to_chw(np.full((4, 4), 200, np.uint16), 1).max()) == pytest.approx(200 / 65535)
