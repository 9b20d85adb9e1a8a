"""Optional Triton import shared by the kernel modules, and what their autograd Functions share.

The template must import on machines without Triton (CPU laptops, macOS). When the import fails,
`triton.jit` becomes a no-op decorator and `tl.constexpr` a placeholder, so the kernel modules still
define their references and autograd Functions; the dispatcher in __init__ never calls a kernel then.
"""

import functools

import torch

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


def first_order_only(op: str):
    """For an autograd Function's backward built from kernel launches, which records no graph: with create_graph
    (a gradient penalty, a Hessian product) it raises instead of returning a gradient whose own gradient is
    silently zero (found by review: a penalty's gradient norm 5.5 where the reference gave 239). once_differentiable
    is not enough: it only refuses when grad_output itself requires grad, and a penalty's does not."""

    def wrap(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():  # the engine runs backward with grad mode on only under create_graph
                raise RuntimeError(
                    f"{op}: a second-order gradient (create_graph=True) through the fused Triton kernel, whose "
                    f"backward builds no graph; leave {op} out of the kernels (KERNEL_OPS in train.py, or "
                    f"kernels.set_ops) for that")
            return backward(ctx, *grads)

        return checked

    return wrap


__all__ = ["HAVE_TRITON", "triton", "tl", "next_pow2", "first_order_only"]
