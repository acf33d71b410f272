"""domainlm.pretrain.kernels: Triton fused kernels for training.

Each kernel module holds an `autograd.Function` (Triton forward and backward) and a plain PyTorch
reference with the same semantics; `modules.py` holds the megatron-core modules built on them.

| module | fuses | public function |
| --- | --- | --- |
| `rmsnorm` | residual add + RMSNorm (fp32 statistics), backward for x, weight, residual | `rms_norm` |
| `swiglu` | `silu(gate) * up` on megatron's fused fc1 output, silu recomputed in backward | `swiglu` |
| `rope` | rotary embedding of q and k in one launch, megatron's `[s, b, h, d]` layout | `apply_rotary` |
| `fused_linear_ce` | output projection + cross-entropy in token chunks, never the full logits | `fused_linear_cross_entropy` |

Where Triton runs: on CUDA tensors, and on CPU tensors when Triton's interpreter is on
(`TRITON_INTERPRET=1`, slow, for tests). Anywhere else the public functions run their PyTorch
reference, so the same model code works on a laptop. Import the functions from their modules
(`from domainlm.pretrain.kernels.swiglu import swiglu`); this package holds the runtime helpers
and does not import triton itself.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

KERNEL_CHOICES = ("triton", "torch")


def interpreter_on() -> bool:
    """True when Triton's CPU interpreter is requested (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton ships with Linux torch wheels
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel launch on tensor `t` can run: CUDA, or CPU under the interpreter."""
    if t.device.type == "cuda":
        return triton_importable()
    return t.device.type == "cpu" and interpreter_on() and triton_importable()


def resolve_kernels(requested: str, device: torch.device | str | None = None) -> str:
    """Map the config value `kernels: triton | torch` onto the path that will actually run.

    `triton` on a machine where Triton cannot launch (CPU without TRITON_INTERPRET=1) becomes
    `torch`; the choice is logged either way so a run's log says which path it used.
    """
    if requested not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {requested!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if requested == "torch":
        return _said("torch", logging.INFO,
                     "kernels: torch (megatron-core's own norm, activation, rotary and loss)")
    if device.type == "cuda" and triton_importable():
        return _said("triton", logging.INFO,
                     f"kernels: triton (compiled for {torch.cuda.get_device_name(device)})")
    if device.type == "cpu" and interpreter_on() and triton_importable():
        return _said("triton", logging.INFO,
                     "kernels: triton (Triton interpreter on CPU, TRITON_INTERPRET=1; slow, for tests)")
    return _said("torch", logging.WARNING,
                 f"kernels: triton requested but Triton cannot run on {device.type} (set "
                 "TRITON_INTERPRET=1 to use its CPU interpreter); using the torch path")


_SAID: set[str] = set()


def _said(choice: str, level: int, message: str) -> str:
    # The model builder asks more than once per run; say it once.
    if message not in _SAID:
        _SAID.add(message)
        log.log(level, message)
    return choice


def lazy_jit(fn: Callable) -> "_LazyKernel":
    """`triton.jit`, applied at the first launch instead of at import.

    Triton decides between compiling and interpreting when a function is decorated, from
    TRITON_INTERPRET at that moment. Deferring the decoration lets a test (or a user) turn the
    interpreter on after this package was imported, and keeps `import triton` off the import path.
    """
    return _LazyKernel(fn)


class _LazyKernel:
    __slots__ = ("fn", "_compiled")

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: dict[bool, object] = {}

    def __getitem__(self, grid):
        import triton

        mode = _interpret_mode()
        _sync_language_mode(mode)
        kernel = self._compiled.get(mode)
        if kernel is None:
            kernel = self._compiled[mode] = triton.jit(self.fn)
        return kernel[grid]


def _interpret_mode() -> bool:
    """Whether triton.jit decorates for the interpreter now. Triton >= 3.4 reads TRITON_INTERPRET
    through `triton.knobs` (which a program may also set directly); before, triton.jit read the
    environment variable itself, so that is the answer there."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4: triton.jit compares the variable with "1"
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def _sync_language_mode(interpret: bool) -> None:
    """Make triton.language's own jit functions (tl.sum, tl.max, tl.sigmoid, ...) match the mode.

    Those are decorated when triton.language is first imported, so a process that imported it
    before TRITON_INTERPRET=1 was set (megatron.core imports triton) holds compiled-mode versions
    that the interpreter cannot call ("Cannot call @triton.jit'd outside of the scope of a
    kernel"), and the reverse breaks compiled kernels after an interpreted run. Re-executing the
    three modules that define them re-decorates them in the current mode (a few ms, only when
    the mode changed).
    """
    import importlib

    import triton.language
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    _snapshot_language()
    if isinstance(std.sum, InterpretedFunction) == interpret:
        return
    if not interpret:
        _restore_language()
    importlib.reload(std)
    importlib.reload(triton.language.random)
    importlib.reload(triton.language)
    log.debug("re-decorated triton.language for %s mode", "interpreter" if interpret else "compiled")


_PRISTINE: list[tuple[object, dict]] | None = None
_INTERPRETER_ADDS = ("__index__", "__bool__", "__repr__", "__str__", "T")
"""Attributes Triton's interpreter sets on triton.language's tensor class (`_patch_lang_tensor`)."""


def _language_objects() -> list:
    import triton.language as tl

    core = tl.core
    objs = [core, tl.math, core.tensor, core.dtype, core.condition]
    if getattr(core, "tensor_descriptor_base", None) is not None:
        objs.append(core.tensor_descriptor_base)
    return objs


def _snapshot_language() -> None:
    global _PRISTINE
    if _PRISTINE is None:
        _PRISTINE = [(o, {k: _unpatched(v) for k, v in vars(o).items()}) for o in _language_objects()]


def _unpatched(value):
    """The builtin behind a stand-in Triton's interpreter put in its place (`_patch_attr` keeps the
    original as its lambda's default argument), else `value`."""
    while callable(value) and getattr(value, "__qualname__", "").startswith("_patch_attr.") and value.__defaults__:
        value = value.__defaults__[0]
    return value


def _restore_language() -> None:
    """Put back what Triton's interpreter leaves patched in triton.language.core (and math, and the
    tensor, dtype and condition classes) before compiling again.

    An interpreted kernel patches the language for its launch and restores it after, but a call of
    a device function inside it (`InterpretedFunction.__call__`, e.g. `tl.sum` or `tl.max` of
    triton.language.standard, whose module sees `triton.language.core`) patches again without
    restoring (triton 3.x, runtime/interpreter.py). The compiler then meets the interpreter's
    stand-ins (`create_icmpSLT(): incompatible function arguments`, a numpy TensorHandle in the
    IR), and reloading triton.language would copy them into its namespace. `_snapshot_language`
    records the objects' attributes at the first kernel launch of the process (before anything
    was interpreted; builtins are unwrapped from any stand-in all the same); this puts them back
    and drops what the interpreter added."""
    _snapshot_language()
    for obj, saved in _PRISTINE:
        now = vars(obj)
        for name in _INTERPRETER_ADDS:
            if name in now and name not in saved:
                delattr(obj, name)
        for name, value in saved.items():
            if now.get(name, _MISSING) is not value:
                setattr(obj, name, value)


_MISSING = object()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_warps_for(block: int) -> int:
    """Warps per program for a row-wise kernel touching `block` elements (Liger/Unsloth heuristic)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one by one; a few partial-sum rows are enough


__all__ = ["KERNEL_CHOICES", "interpreter_on", "lazy_jit", "resolve_kernels", "use_triton"]
