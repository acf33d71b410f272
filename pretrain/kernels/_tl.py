"""`triton.language` for the kernel modules, or a stand-in where triton is not installed.

Kernel signatures annotate block sizes with `tl.constexpr`, evaluated when the module is
imported; the stand-in lets the modules (and their PyTorch references) import without triton.
"""

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - Linux torch wheels ship triton

    class tl:  # noqa: N801
        constexpr = "constexpr"

__all__ = ["tl"]
