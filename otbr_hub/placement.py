"""Where computation runs. Accelerate decides for ``auto`` so that ``accelerate launch``
gives each process its own GPU; OT solves always stay on the CPU in float64."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, ContextManager

import torch
from torch import nn

from .errors import UsageError

if TYPE_CHECKING:
    from .load import InputSpec


def check_device_name(name: str) -> None:
    """A one-line UsageError for a device other than auto, cpu, cuda or cuda:N, before
    torch's own error (a list of every backend it knows) can reach the user."""
    from .settings import check_device

    check_device(name, "--device")


def resolve_device(name: str = "auto") -> torch.device:
    """Map 'auto' | 'cpu' | 'cuda[:N]' to a torch device, with a clear error for missing CUDA.

    ``auto`` is Accelerate's choice (``PartialState().device``): this process's GPU when
    there is one, the CPU otherwise. A bare ``cuda`` in a launched multi-process run also
    means this process's own GPU, not GPU 0 for everyone.
    """
    from .distribute import launched_processes, state

    check_device_name(name)
    if name == "auto":
        device = state("auto").device
        return torch.device("cpu") if device.type == "cpu" else device  # Gloo reports 'cpu:0'
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA GPU is available")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--device {name} was asked for but only {count} CUDA GPU{'s' if count != 1 else ''} "
                         f"{'are' if count != 1 else 'is'} visible (cuda:0 to cuda:{count - 1})")
    if name == "cuda" and launched_processes() > 1:
        return state("cuda").device
    return torch.device(name)


log = logging.getLogger("otbr_hub")

CPU_ACTIVATION_BUDGET = 192 * 2**20
"""Bytes of layer outputs one pass may hold on a CPU. Importing torch alone takes about
0.7 GB of RSS and a repair holds up to three copies of the weights, so this keeps resnet50 at
224 px under 3 x its fp32 weights + 1.5 GB: one image a pass in float32 (133 MB of
outputs), two under bfloat16 (66 MB each; at 256 MB it took three and peaked at 1.9 GB
against the 1.81 GB budget); measured in ``benchmarks/SPEED_NOTES.md``."""

GPU_ACTIVATION_SHARE = 0.25
"""Share of the GPU's total memory that one pass may hold (of its free memory when less is
free). Total, not free, memory sets it so that the same seed on the same kind of GPU gives
the same slices, hence the same BatchNorm batch statistics and the same weights."""


def activation_bytes_per_image(model: nn.Module, spec: "InputSpec", side: int | None = None,
                               precision: str = "fp32") -> int:
    """Bytes of layer outputs one image produces: a forward pass of two images with a hook
    on every leaf module, under the ``precision`` the pass will run with (bfloat16 outputs
    take half the bytes). Backward keeps about this much per image (saved outputs and the
    gradients flowing back), so it sizes the slices that bound memory."""
    from .load import eval_mode, forward_logits, model_device, model_dtype

    total = 0

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    h, w = (side, side) if side else (spec.height, spec.width)
    try:
        with eval_mode(model), torch.no_grad():
            x = torch.zeros(2, spec.channels, h, w, dtype=model_dtype(model), device=model_device(model))
            with gradient_precision(precision, x.device, spec):
                forward_logits(model, x)
    finally:
        for hd in handles:
            hd.remove()
    return max(1, total // 2)


def images_per_pass(model: nn.Module, spec: "InputSpec", side: int | None = None, budget: int | None = None,
                    precision: str = "fp32") -> int:
    """How many images fit in one forward/backward pass under the activation budget: the
    CPU's fixed budget, or a share of the GPU's free memory. Small models (Fashion-MNIST
    scale) fit the paper's 256-image batch whole; resnet50 at 224 px takes one or two images
    on a CPU (two under bfloat16, whose activations are half the size)."""
    from .load import model_device

    gpu = False
    if budget is None:
        device = model_device(model)
        if device.type == "cuda":
            gpu = True
            budget = gpu_activation_budget(*torch.cuda.mem_get_info(device))
        else:
            budget = CPU_ACTIVATION_BUDGET
    fit = max(1, int(budget // activation_bytes_per_image(model, spec, side, precision)))
    return 1 << (fit.bit_length() - 1) if gpu else fit  # a power of two: the same on GPUs whose budgets differ a little


def gpu_activation_budget(free: int, total: int) -> int:
    """Bytes one pass may hold on a GPU with ``free`` of ``total`` bytes free: a share of the
    total, so that reruns slice alike; half of what is free when that is less (a busy GPU),
    with a warning that the slices, and so the weights, may then differ between runs."""
    budget = int(total * GPU_ACTIVATION_SHARE)
    if free // 2 < budget:
        budget = free // 2
        log.warning("only %.1f of %.1f GiB of GPU memory is free: noise slices are sized by it, so a rerun may "
                    "use other slices (set unlearn_chunk / --unlearn-chunk for the same weights every time)",
                    free / 2**30, total / 2**30)
    return budget


PRECISIONS = ("fp32", "bf16", "auto")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether this device runs bfloat16 matrix products natively: a CUDA GPU that supports
    them, or a CPU with AVX512-BF16 or AMX (elsewhere CPU bfloat16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


BF16_MIN_PIXELS = 96 * 96
"""'auto' uses bfloat16 from this input area up. A speed rule, not a quality one: on a 2-core
AVX512-BF16 CPU bfloat16 made image forward/backward passes 2.2x (resnet50), 2.5x (ViT-B/16)
and 3.3x (convnext_tiny) faster at 224 px, but 0.5-1.15x at 32 px, where the products are
too small to gain from it. With bfloat16 forced on 17 zoo models (32 px) rankings and
verdicts moved far less than with another seed; trained 224 px models were not available to
measure (``benchmarks/SPEED_NOTES.md``, "Session 4")."""


def resolve_precision(precision: str, device: torch.device, spec: "InputSpec | None" = None) -> str:
    """'auto' -> 'bf16' where :func:`bf16_is_fast` and the input has at least
    :data:`BF16_MIN_PIXELS` pixels, 'fp32' otherwise; other values as given."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "auto":
        big = spec is None or spec.height * spec.width >= BF16_MIN_PIXELS
        return "bf16" if big and bf16_is_fast(device) else "fp32"
    return precision


def gradient_precision(precision: str, device: torch.device, spec: "InputSpec | None" = None) -> ContextManager[Any]:
    """Autocast for the stages that push many images through forward *and* backward passes
    (unlearning, the margin search, synthesising probes): 'bf16' runs convolutions and
    matrix products in bfloat16, while weights, optimiser state and the losses stay float32.
    Nothing that is *reported* as a measurement (agreement, ACC/ASR) runs under it, and OT
    fusion is float64 on the CPU. Measured on 17 zoo models: NWC rankings agree with
    float32 at Spearman >= 0.999 (another seed: 0.945-0.997) and every margin verdict is
    the same (``benchmarks/SPEED_NOTES.md``)."""
    if resolve_precision(precision, device, spec) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def release_memory() -> None:
    """Hand freed heap pages back to the OS after a stage that allocated a lot (unlearning's
    activations and optimiser state). glibc keeps small freed blocks in its arenas, so RSS
    would stay at the unlearning peak and the later stages would stack on top of it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
