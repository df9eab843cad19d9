"""Stage 4: optimal-transport fusion of the pruned model into the original's neuron order.

For each scored layer from the first one with a pruned neuron onwards, an exact OT plan
(POT's ``ot.emd``) moves uniform mass on the pruned neurons to NWC-proportional mass on
the original neurons, with Euclidean cost between flattened filters. The pruned layer is
first aligned on its *input* axis with the previous layer's plan, then mapped through its
own plan and averaged with the original: ``lam * fused + (1 - lam) * original``.

Which layer feeds which (``links``):

* ``chain="dataflow"`` (default): a layer's outputs are mapped through its plan, and the
  next layer's inputs aligned with it, only where re-ordering the two together leaves the
  model's function unchanged (:func:`dataflow_links`, tested with a random permutation). A
  layer that writes into a residual sum, has a second reader, is followed by a LayerNorm,
  is depthwise or feeds the classifier keeps its neuron order (its pruned neurons get
  ``1 - lam`` of their weights back; with an attached BatchNorm, whose scale and shift are
  blended the same way while its running statistics stay the original's, the channel's
  output is not simply ``1 - lam`` of the original's): a plan applied there would re-order
  channels that something else still reads in the old order.
* ``chain="order"``: the reference code's rule, plans chained in parameter order wherever
  the widths match, residual topology ignored (the ``paper`` preset).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import logging

import numpy as np
import ot
import torch
from scipy import sparse
from torch import nn

from .layers import Layer
from .load import InputSpec, eval_mode, forward_logits, model_device

log = logging.getLogger("otbr_hub")

_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class FuseResult:
    """The fused model and a per-layer account of what the fusion did."""

    model: nn.Module
    lam: float
    first_layer: str | None
    fused_layers: list[str] = field(default_factory=list)
    aligned_layers: list[str] = field(default_factory=list)
    mapped_layers: list[str] = field(default_factory=list)
    """Layers whose neurons went through their OT plan (the others kept their order)."""
    plan_cost: dict[str, float] = field(default_factory=dict)


def target_mass(nwc: np.ndarray) -> np.ndarray:
    """NWC normalised to a distribution; zeros and non-finite values get a small floor so
    that ``1 / mass`` stays finite (an all-zero layer becomes uniform)."""
    v = np.nan_to_num(np.asarray(nwc, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    v = np.clip(v, 0.0, None)
    total = v.sum()
    if total <= 0:
        return np.full(v.shape, 1.0 / v.size)
    floor = 1e-6 * total / v.size
    v = np.maximum(v, floor)
    return v / v.sum()


def transport_plan(w_pruned: np.ndarray, w_orig: np.ndarray, b: np.ndarray, cost: np.ndarray | None = None) -> np.ndarray:
    """Exact OT plan from uniform mass on pruned neurons to mass ``b`` on original neurons.

    ``cost`` is the Euclidean cost matrix when the caller already has it. The solver stays
    the exact network simplex: its plans are basic solutions with at most ``2n - 1``
    non-zeros (never a permutation here, as ``b`` is not uniform), which the fusion
    exploits below. A solve that stops at the iteration cap is not optimal, so it is logged.
    """
    n = w_pruned.shape[0]
    a = np.full(n, 1.0 / n)
    if cost is None:
        cost = ot.dist(w_pruned, w_orig, metric="euclidean")
    plan, info = ot.emd(a, b, cost, numItermax=max(100_000, 50 * n * n), log=True)
    if info.get("warning"):
        log.warning("optimal transport for a layer of %d neurons did not converge: %s", n, info["warning"])
    return plan


def _sparse_map(plan: np.ndarray, scale: np.ndarray, transpose: bool) -> sparse.csr_matrix:
    """``plan diag(1/scale)`` or ``diag(1/scale) plan^T`` as a sparse matrix. An exact plan has
    about ``2n`` non-zeros out of ``n^2``, so products with it cost O(n d) instead of O(n^2 d)
    and give the same values (only terms that are exactly zero are skipped)."""
    m = sparse.csr_matrix(plan.T if transpose else plan)
    return (sparse.diags(1.0 / scale) @ m).tocsr() if transpose else (m @ sparse.diags(1.0 / scale)).tocsr()


def align_inputs(w: np.ndarray, plan_prev: np.ndarray, b_prev: np.ndarray) -> np.ndarray:
    """Re-express a layer's input axis in the previous layer's original neuron order:
    ``W[p, :, k] @ (T_prev diag(1 / b_prev))`` at every kernel position."""
    a_mat = _sparse_map(plan_prev, b_prev, transpose=False)
    p, i, k = w.shape
    rows = np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(p * k, i)  # one row per (neuron, kernel position)
    aligned = np.asarray((a_mat.T @ rows.T).T)  # rows @ a_mat, computed sparse-times-dense
    return aligned.reshape(p, k, -1).transpose(0, 2, 1)


def dataflow_links(model: nn.Module, spec: InputSpec, layers: list[Layer], *, attached: bool = True) -> list[bool]:
    """``links[i]``: re-ordering the neurons of ``layers[i]`` and the inputs of ``layers[i + 1]``
    the same way leaves the model's function unchanged.

    That is what mapping layer i through its OT plan and aligning layer i + 1 with it needs,
    and it is tested, not parsed, so it holds for any library's forward code: a random
    permutation is applied to layer i's rows (with its bias and, when ``attached``, the
    BatchNorm that travels with it) and to layer i + 1's input columns, and the logits of two
    images must stay the same. It fails wherever the channels are read in their old order by
    something else: a residual sum or a second consumer of layer i's output, a LayerNorm /
    GroupNorm in between (its per-channel affine is not re-ordered), a depthwise layer i
    (its inputs would have to move too), attention heads. The model is restored exactly.
    """
    n = len(layers)
    links = [False] * n
    if n < 2:
        return links
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(0)
    x = spec.normalize(torch.rand(2, spec.channels, spec.height, spec.width, generator=gen)).to(model_device(model))
    with torch.no_grad(), eval_mode(model):
        reference = forward_logits(model, x).float()
        tol = 1e-4 * (float(reference.abs().max()) + 1e-6)
        for i, (a, b) in enumerate(zip(layers, layers[1:])):
            if b.groups != 1 or a.groups != 1 or a.n_out != b.n_in:
                continue
            perm = torch.randperm(a.n_out, generator=gen)
            touched = _permuted_tensors(a, b, mods, attached)
            saved = [t.detach().clone() for t, _ in touched]
            try:
                for t, axis in touched:
                    t.copy_(t.index_select(axis, perm.to(t.device)))
                out = forward_logits(model, x).float()
                links[i] = bool(torch.isfinite(out).all()) and float((out - reference).abs().max()) <= tol
            except Exception as err:  # a forward that cannot run this way: no link, the safe side
                log.debug("data-flow probe %s -> %s failed: %s", a.name, b.name, err)
            finally:
                for (t, _), v in zip(touched, saved):
                    t.copy_(v)
    return links  # the last scored layer stays False: its reader, the classifier, is never aligned


def _permuted_tensors(a: Layer, b: Layer, mods: dict[str, nn.Module], attached: bool) -> list[tuple[torch.Tensor, int]]:
    """(tensor, axis) pairs that re-ordering layer a's neurons touches: a's rows, bias and
    attached norm (what :func:`fuse` maps), and b's input columns."""
    out = [(mods[a.name].weight, 0)]
    if getattr(mods[a.name], "bias", None) is not None:
        out.append((mods[a.name].bias, 0))
    if attached and a.norm_name:
        norm = mods[a.norm_name]
        out += [(getattr(norm, t), 0) for t in _NORM_TENSORS if getattr(norm, t, None) is not None]
    out.append((mods[b.name].weight, 1))
    return out


def order_links(layers: list[Layer], heads: Collection[str] = ()) -> list[bool]:
    """The reference rule: every layer is mapped through its plan, and the next scored layer
    aligned with it wherever the widths match (checked in :func:`fuse`). A class head among
    the layers (``include_classifier``) is never mapped: its rows are the classes, and
    mapping them would hand one class's weights to another."""
    return [layer.name not in heads for layer in layers]


def fuse(
    original: nn.Module,
    pruned: nn.Module,
    layers: list[Layer],
    nwc: dict[str, torch.Tensor],
    pruned_idx: dict[str, list[int]],
    lam: float,
    *,
    fuse_attached: bool = True,
    links: list[bool] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> FuseResult:
    """Fuse ``pruned`` into ``original``; returns a new model, both inputs are left untouched.

    ``links`` (one per layer, see :func:`dataflow_links`): ``links[i]`` maps layer i's
    neurons through its OT plan and aligns layer i + 1's inputs with it; without it a layer
    keeps its neuron order. Default: :func:`order_links` (the reference: every layer mapped,
    the last one too, although its reader, the classifier, is never aligned).
    ``progress("fuse", i, n)`` is called after each of the ``n`` layers when given."""
    fused = copy.deepcopy(original)
    result = FuseResult(model=fused, lam=lam, first_layer=None)
    start = next((i for i, l in enumerate(layers) if pruned_idx.get(l.name)), None)
    if start is None:
        return result
    result.first_layer = layers[start].name
    mods_o = dict(original.named_modules())
    mods_p = dict(pruned.named_modules())
    mods_f = dict(fused.named_modules())
    links = order_links(layers) if links is None else links
    if len(links) != len(layers):
        raise ValueError(f"fuse: {len(links)} links for {len(layers)} layers")
    prev: tuple[np.ndarray, np.ndarray] | None = None
    todo = layers[start:]
    for done, layer in enumerate(todo, 1):
        i = start + done - 1
        w_bd_t = mods_o[layer.name].weight.detach()
        w_bd = w_bd_t.double().cpu().numpy()
        w_pn = mods_p[layer.name].weight.detach().double().cpu().numpy()
        n = w_bd.shape[0]
        w_al = w_pn.reshape(n, w_pn.shape[1], -1)
        if prev is not None and layer.groups == 1 and w_pn.shape[1] == prev[0].shape[0]:
            w_al = align_inputs(w_al, *prev)
            result.aligned_layers.append(layer.name)
        prev = None
        mapping = None
        if links[i]:
            flat_bd, flat_pn = w_bd.reshape(n, -1), w_pn.reshape(n, -1)
            b = target_mass(nwc[layer.name].numpy())
            cost = ot.dist(flat_pn, flat_bd, metric="euclidean")
            plan = transport_plan(flat_pn, flat_bd, b, cost=cost)
            result.plan_cost[layer.name] = float((plan * cost).sum())
            del cost
            mapping = _sparse_map(plan, b, transpose=True)  # diag(1/b) T^T
            w_fused = np.asarray(mapping @ w_al.reshape(n, -1)).reshape(w_bd.shape)
            prev = (plan, b)
            result.mapped_layers.append(layer.name)
        else:  # keeps its neuron order: nothing downstream reads it re-ordered
            w_fused = w_al.reshape(w_bd.shape)
        new = lam * w_fused + (1.0 - lam) * w_bd
        if not np.isfinite(new).all():
            raise FloatingPointError(f"fusion produced non-finite weights in {layer.name}")
        with torch.no_grad():
            mods_f[layer.name].weight.copy_(torch.from_numpy(new).to(w_bd_t.dtype))
            if fuse_attached:
                _fuse_attached(layer, mods_o, mods_p, mods_f, mapping, lam)
        result.fused_layers.append(layer.name)
        if progress is not None:
            progress("fuse", done, len(todo))
    return result


def _fuse_attached(layer: Layer, mods_o: dict, mods_p: dict, mods_f: dict, mapping: sparse.csr_matrix | None,
                   lam: float) -> None:
    """Carry the neuron's bias and its BatchNorm channel through the same OT map (``None``:
    the layer keeps its order, so they are averaged channel by channel)."""
    pairs = [(layer.name, "bias")]
    if layer.norm_name:
        pairs += [(layer.norm_name, t) for t in _NORM_TENSORS]
    for mod_name, attr in pairs:
        t_o = getattr(mods_o[mod_name], attr, None)
        if t_o is None:
            continue
        v_o = t_o.detach().double().cpu().numpy()
        v_p = getattr(mods_p[mod_name], attr).detach().double().cpu().numpy()
        v = lam * (np.asarray(mapping @ v_p) if mapping is not None else v_p) + (1.0 - lam) * v_o
        if attr == "running_var":
            v = np.maximum(v, 1e-8)
        getattr(mods_f[mod_name], attr).copy_(torch.from_numpy(v).to(t_o.dtype))
