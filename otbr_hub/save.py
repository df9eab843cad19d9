"""Save a repaired model in its source's own format, atomically, safetensors only.

The folder is written next to the destination under a hidden temporary name and moved
into place only once complete, so an interrupted run never leaves half a model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clip import bounds_config
from .errors import OtbrError, UnsupportedModelError, UsageError
from .load import LoadedModel, read_json_object

# Largest safetensors file written for a transformers model; bigger ones are split into shards
# plus an index, which transformers reads (timm does not: timm models are one file whatever
# their size). Callers (and tests) pass ``max_shard_size`` to use another threshold.
MAX_SHARD_SIZE: int | str = "2GB"
_NO_SHARDS = 1 << 62  # bytes: more than any model
# Files describing preprocessing that travel with the weights.
_CARRY = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")


_MAX_NAME = 255 - 24
"""Longest output folder name (bytes): the folder is written as ``.NAME.XXXXXXXX.tmp`` next to
it and renamed, and most filesystems take 255 bytes per name."""


def check_destination(out_dir: str | Path, *, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Fail early (before any work) when the destination cannot be written, or when writing it
    would replace ``source`` (the folder the model is read from) or a folder that holds it."""
    out = Path(out_dir).expanduser().absolute()
    try:
        out = _follow_link(out, out_dir)
        return _check_destination(out, out_dir, overwrite, source)
    except OSError as err:  # a name or path too long for the filesystem, a loop of links...
        raise UsageError(f"cannot use {out_dir} as the output folder: {err.strerror or err}") from None


def _follow_link(out: Path, out_dir: str | Path) -> Path:
    """A symlinked destination means its target: the link stays and the folder it points to
    is written (replacing the link itself would leave the target untouched)."""
    if not out.is_symlink():
        return out
    target = out.resolve()
    if not target.exists():
        raise UsageError(f"{out_dir} is a symbolic link to {target}, which does not exist")
    return target


def _check_destination(out: Path, out_dir: str | Path, overwrite: bool, source: str | Path | None) -> Path:
    if len(os.fsencode(out.name)) > _MAX_NAME:
        raise UsageError(f"the output folder's name is {len(os.fsencode(out.name))} bytes long; names of at "
                         f"most {_MAX_NAME} bytes leave room for the temporary name it is written under")
    if not out.parent.exists():
        raise UsageError(f"the parent folder of {out_dir} does not exist")
    if not out.parent.is_dir():
        raise UsageError(f"the parent of {out_dir} is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out_dir} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out_dir} is not empty (pass --overwrite, or overwrite=True from Python, to replace it)")
    if source is not None and would_replace(out, source):
        raise UsageError(f"{out_dir} holds the source model {source}: write the repaired model somewhere else")
    check_writable(out.parent)
    return out


def would_replace(out: str | Path, source: str | Path) -> bool:
    """Whether writing the folder ``out`` would replace the local ``source`` or a folder holding it."""
    src = Path(source).expanduser()
    if not src.exists():
        return False
    src, target = src.resolve(), Path(out).expanduser().resolve()
    return target == src or target in src.parents


def write_problem(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (read-only, /sys, ...), or None: probed by
    making and removing an empty folder there."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".otbr-write-check-", dir=folder))
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_writable(folder: Path) -> None:
    """A one-line UsageError if nothing can be created in ``folder``."""
    why = write_problem(folder)
    if why is not None:
        raise UsageError(f"cannot write to {folder}: {why}")


def _cast_state_dict(model: nn.Module, source: LoadedModel) -> dict[str, torch.Tensor]:
    """The weights to write: each floating-point tensor in the dtype the source stored it in,
    and a tensor of its own for every name. Tied weights (one tensor under two names) would
    otherwise be written once (``save_torch_state_dict`` drops the second name), and timm,
    which knows nothing of the tie, could not load the folder."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        v = v.detach()
        if v.is_floating_point():
            dtype = source.dtypes.get(k, source.dtype)
            v = fitting_cast(k, v, v.to("cpu", dtype))
        else:
            v = v.cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def write_folder(source: LoadedModel, model: nn.Module, folder: Path, extra_files: dict[str, Any] | None = None,
                 *, max_shard_size: int | str | None = None) -> None:
    """Write ``model`` into an existing empty ``folder`` the way ``source`` was stored."""
    from huggingface_hub import save_torch_state_dict

    shard = MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
    model = plain_weights(model)
    if source.library == "transformers":
        model = _as_dtype(model, source.dtype, source.dtypes)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
        _match_label_count(folder / "config.json", source.spec.num_classes)
    else:
        relu6 = source.library == "timm" and bounds_config(model).get("act_layer") == "relu6"  # otbr_hub.clip
        if source.library == "timm" and source.folder is not None and (source.folder / "config.json").is_file():
            if relu6:
                cfg = read_json_object(source.folder / "config.json")
                cfg["model_args"] = {**(cfg.get("model_args") or {}), "act_layer": "relu6"}
                (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            else:
                shutil.copyfile(source.folder / "config.json", folder / "config.json")
        elif source.library == "timm":
            if not (getattr(model, "pretrained_cfg", None) or {}).get("architecture"):
                raise OtbrError(
                    f"cannot save this timm {type(model).__name__} as a model folder: it was not built with "
                    "timm.create_model, so there is no architecture name to rebuild it from"
                )
            from timm.models import save_for_hf  # noqa: F401  (ensures timm's hub helpers are present)
            from timm.models._hub import save_config_for_hf

            spec = source.spec
            # the input it was repaired for, as timm's export records preprocessing (data_config also
            # drops the architecture's default test_input_size, e.g. 288 px, which would not apply)
            data = {"input_size": (spec.channels, spec.height, spec.width), "mean": tuple(spec.mean), "std": tuple(spec.std)}
            try:
                save_config_for_hf(model, str(folder / "config.json"),
                                   model_config={"pretrained_cfg": {"num_classes": spec.num_classes}},
                                   data_config=data, model_args={"act_layer": "relu6"} if relu6 else None)
            except ValueError as err:  # a create_model argument that is a Python object, not JSON
                raise OtbrError(f"cannot write a timm config.json for this model ({err}); build it with names "
                                "instead of Python objects (e.g. act_layer='silu', not nn.SiLU) to save it as a folder, "
                                "or save result.model.state_dict() yourself") from None
            cfg = read_json_object(folder / "config.json")
            args = cfg.get("model_args") or {}
            if cfg.get("num_classes") != spec.num_classes or args.get("num_classes", spec.num_classes) != spec.num_classes:
                # a head swapped after create_model: rebuild it at its real width
                cfg["num_classes"] = spec.num_classes
                if "num_classes" in args:
                    args["num_classes"] = spec.num_classes
                (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        # timm reads one model.safetensors (its Hub and local-dir loaders know no shard index)
        save_torch_state_dict(_cast_state_dict(model, source), folder,
                              max_shard_size=shard if source.library != "timm" else _NO_SHARDS)
    if source.library == "transformers" and source.folder is None:
        # an in-memory model: record the input it was repaired for (its config may not say)
        _write_processor_config(folder / "preprocessor_config.json", source.spec)
        _record_image_size(model, source.spec, folder / "config.json")
    elif source.library == "transformers" and not any((source.folder / n).is_file() for n in _CARRY):
        # a folder without an image processor: write the one the repair assumed, so that the
        # card's AutoImageProcessor.from_pretrained(...) works on the result
        _write_processor_config(folder / "preprocessor_config.json", source.spec)
    if source.folder is not None:
        for name in _CARRY:
            if (source.folder / name).is_file() and not (folder / name).exists():
                shutil.copyfile(source.folder / name, folder / name)
    for name, content in (extra_files or {}).items():
        data = content if isinstance(content, (str, bytes)) else json.dumps(content, indent=2, default=str)
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(folder / name, mode) as fh:
            fh.write(data)


def _match_label_count(path: Path, num_classes: int) -> None:
    """A head swapped after ``from_pretrained`` leaves the config's labels at the old count,
    and transformers then refuses the folder (size mismatch): give the config generic labels
    of the real count. Labels of the right count are kept."""
    cfg = read_json_object(path)
    if len(cfg.get("id2label") or {}) == num_classes:
        return
    cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_classes)}
    cfg["label2id"] = {f"LABEL_{i}": i for i in range(num_classes)}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def plain_weights(model: nn.Module) -> nn.Module:
    """``model`` with every weight stored as a plain tensor: a copy with parametrizations
    (``torch.nn.utils.parametrize``, the new weight/spectral norm), the old weight/spectral norm
    hooks and ``torch.nn.utils.prune`` masks folded into the weights they compute. A saved
    folder is rebuilt from its config, whose layers know only ``weight``; ``weight_orig`` or
    ``parametrizations.weight.original0`` would be unexpected keys (or, in transformers,
    silently missing weights). The forward pass is unchanged. ``model`` itself when it has none."""
    import copy

    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = (WeightNorm, SpectralNorm, prune.BasePruningMethod)

    def computed(m: nn.Module) -> bool:
        return parametrize.is_parametrized(m) or any(isinstance(h, hooks) for h in m._forward_pre_hooks.values())

    if not any(computed(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        if parametrize.is_parametrized(m):
            # the copy shares the generated Parametrized* class with the original, and the
            # removal deletes the weight property from that class: give the copy its own first
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                torch.nn.utils.remove_weight_norm(m, hook.name)
            elif isinstance(hook, SpectralNorm):
                torch.nn.utils.remove_spectral_norm(m, hook.name)
            elif isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
    return model


def _record_image_size(model: nn.Module, spec: Any, config_path: Path) -> None:
    """Make the saved ``config.json`` say the input size the model was repaired at.

    The loader reads a transformers model's size from ``config.image_size`` first; a model
    built with a nominal ``image_size`` (SwiftFormer, TextNet: convolutional, any size works)
    and repaired at another one would otherwise come back at the config's size. The entry is
    changed only when a model built from the changed config has the same parameters and gives
    the same logits, i.e. when ``image_size`` is a label and not a shape (a ViT's is a shape)."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "image_size", None)
    if cfg is None or size is None:
        return
    from .load import _size_pair

    if _size_pair(size) == (spec.height, spec.width):
        return
    import copy

    changed = copy.deepcopy(cfg)
    changed.image_size = spec.height if spec.height == spec.width else [spec.height, spec.width]
    try:
        with torch.device("meta"):
            probe = type(model)(changed)
        ours = model.state_dict()
        if {k: v.shape for k, v in probe.state_dict().items()} != {k: v.shape for k, v in ours.items()}:
            return
        rebuilt = type(model)(changed).to(next(model.parameters()).dtype)
        rebuilt.load_state_dict(ours)
        x = torch.rand(2, spec.channels, spec.height, spec.width, dtype=next(model.parameters()).dtype)
        from .load import eval_mode

        with torch.no_grad(), eval_mode(model):
            same = torch.allclose(rebuilt.eval()(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5, rtol=1e-4)
    except Exception:  # any doubt: keep the config as the source had it
        return
    if same:
        data = read_json_object(config_path)
        data["image_size"] = changed.image_size
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_processor_config(path: Path, spec: Any) -> None:
    """A plain image processor (resize to the input size, scale to [0, 1], normalise with the
    input's mean/std): exactly what the engine assumed, and what :func:`otbr_hub.load.load_folder`
    reads the input size and normalisation back from."""
    config = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": spec.height, "width": spec.width},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
    }
    path.write_text(json.dumps(config, indent=2) + "\n")


def _as_dtype(model: nn.Module, dtype: torch.dtype, dtypes: dict[str, torch.dtype] | None = None) -> nn.Module:
    """A copy in the source dtype (the engine computes in fp32), with the tensors ``dtypes``
    names (``LoadedModel.dtypes``: an in-memory model's fp32 norms in an fp16 model) in theirs."""
    import copy

    if next(model.parameters()).dtype == dtype and not dtypes:
        return model
    out = copy.deepcopy(model).to(dtype)
    tensors = dict(out.named_parameters())
    tensors.update(dict(out.named_buffers()))
    for name, kept in (dtypes or {}).items():
        if name in tensors and tensors[name].is_floating_point():
            tensors[name].data = tensors[name].data.to(kept)
    computed = dict(model.named_parameters())
    computed.update(dict(model.named_buffers()))
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and name in computed:
            fitting_cast(name, computed[name], tensor)
    return out


def fitting_cast(name: str, computed: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
    """``cast`` (``computed`` in the source's dtype), or an error when the cast overflowed: fusion
    can move weights past float16's range, and a file of infinities must not be saved."""
    if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(computed).all()):
        raise OtbrError(f"the repaired tensor {name} does not fit in {str(cast.dtype).replace('torch.', '')}, "
                        "the dtype the source stores it in (values up to "
                        f"{computed.abs().max().item():.3g}); nothing was saved")
    return cast


def _shareable(folder: Path) -> None:
    """Ordinary permissions (0755 folders, 0644 files, less what the umask takes away):
    ``mkdtemp`` makes the folder 0700 and some writers make their files 0600, which would keep
    other users of a shared ``--output`` from reading the model."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o755 if path.is_dir() else 0o644) & ~mask)


def check_savable(source: LoadedModel) -> None:
    """Only timm and transformers models can be written as a folder that loads again: a plain
    torch module has no config to rebuild its class from."""
    if source.library not in ("timm", "transformers"):
        raise UnsupportedModelError(
            f"cannot save a plain torch {type(source.model).__name__} as a model folder: it has no timm or "
            "transformers config to rebuild it from; save result.model.state_dict() yourself "
            "(e.g. safetensors.torch.save_file)"
        )


def report_files(source: LoadedModel, report: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """What goes next to the weights: the report, and the model card a push would write, so a
    saved folder is ready to upload as it is (``--push`` renders it again for the destination)."""
    from .card import render_card
    from .fetch import source_readme

    card = render_card(report, source_readme=source_readme(source), folder_name=Path(out_dir).expanduser().absolute().name)
    return {"otbr_report.json": report, "README.md": card}


def check_reloads(source: LoadedModel, model: nn.Module, folder: Path) -> None:
    """An in-memory model's written folder must rebuild it: same tensor names and shapes when
    loaded the way timm or transformers would (from its config). A module replaced after the
    model was built (a head swapped for a ``Sequential``, say) is not in the config, and its
    folder would fail for every user who tries to load it. (A folder or Hub source was built
    from the same config when it was loaded, so it is not loaded a second time.)"""
    from .errors import error_text
    from .load import load_folder
    from .verify import compare_state_dicts

    if source.folder is not None:  # rebuilt from this very config already when it was loaded
        return
    try:
        problems = compare_state_dicts(plain_weights(model).state_dict(),
                                       load_folder(folder, inspected=True).model.state_dict(), check_dtype=False)
    except Exception as err:  # whatever keeps the folder from loading, said in one line
        problems = [error_text(err)]
    if problems:
        raise OtbrError(f"the saved folder would not rebuild this model from its config ({'; '.join(problems[:2])}): "
                        f"a module changed after the {source.library} model was built cannot be saved in "
                        f"{source.library}'s format; nothing was saved")


def save_model(source: LoadedModel, model: nn.Module, out_dir: str | Path, *, extra_files: dict[str, Any] | None = None,
               overwrite: bool = False, max_shard_size: int | str | None = None) -> Path:
    """Save atomically into ``out_dir``; returns its absolute path. Weights above
    ``max_shard_size`` (default :data:`MAX_SHARD_SIZE`) are sharded with an index (transformers only)."""
    check_savable(source)
    out = check_destination(out_dir, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        write_folder(source, model, tmp, extra_files, max_shard_size=max_shard_size)
        check_reloads(source, model, tmp)
        _shareable(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException as err:  # Ctrl-C too: no hidden half-written copy stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # interrupted between the two moves: the earlier output comes back
        if isinstance(err, OtbrError) or not isinstance(err, Exception):
            raise
        raise OtbrError(f"could not save the model to {out_dir}: {err}") from None
    shutil.rmtree(old, ignore_errors=True)
    return out
