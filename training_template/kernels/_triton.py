"""Optional Triton import shared by the kernel modules.

The template must import on machines without Triton (CPU laptops, macOS). When the import fails,
`triton.jit` becomes a no-op decorator and `tl.constexpr` a placeholder, so the kernel modules still
define their references and autograd Functions; the dispatcher in __init__ never calls a kernel then.
"""

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pure-PyTorch install
    HAVE_TRITON = False

    class _Stub:
        constexpr = object

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _Stub()  # type: ignore[assignment]
    tl = _Stub()  # type: ignore[assignment]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


__all__ = ["HAVE_TRITON", "triton", "tl", "next_pow2"]
