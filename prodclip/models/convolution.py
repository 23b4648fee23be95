"""NHWC 2-D convolutions with an explicit formulation for XLA:CPU and the native one elsewhere.

XLA:CPU runs grouped (depthwise) convolutions far below its matmul speed, and no CPU flag
changes that. The explicit formulation writes each convolution as the operations XLA:CPU is
fast at:

- depthwise (groups == Cin == Cout): kh*kw shifted (strided) slices of the padded input, each
  multiplied by one tap of the kernel and summed;
- 1x1 (groups == 1): a strided slice, then one einsum over channels;
- dense kxk (groups == 1): the kh*kw shifted slices stacked on a new axis (im2col), then one
  einsum over (tap, channel).

Other group counts use the native convolution. On any other backend "auto" is the native
`lax.conv_general_dilated`. Both formulations compute the same sums (float32 results agree to
rounding, see tests/test_convolution.py); the speed of each on the 2-core CPU is measured by
benchmarks/conv_formulations.py.

Shapes: x [B, H, W, Cin]; kernel HWIO [kh, kw, Cin / groups, Cout]; output [B, Ho, Wo, Cout].
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

Padding = Union[str, Sequence[tuple[int, int]]]
FORMULATIONS = ("auto", "explicit", "native")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF / lax 'SAME' padding of one spatial axis: output ceil(size / stride), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve_padding(padding: Padding, spatial: Sequence[int], kernel: Sequence[int],
                    stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) for 'SAME', 'VALID' or explicit pairs."""
    if isinstance(padding, str):
        if padding.upper() == "SAME":
            return tuple(same_padding(n, k, stride) for n, k in zip(spatial, kernel))
        if padding.upper() == "VALID":
            return (0, 0), (0, 0)
        raise ValueError(f"padding {padding!r} is not 'SAME', 'VALID' or ((top, bottom), (left, right))")
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pairs) != 2:
        raise ValueError(f"explicit padding needs two (low, high) pairs, got {padding!r}")
    return pairs


def resolve_formulation(formulation: str) -> str:
    """'explicit' on the CPU backend and 'native' elsewhere for 'auto'; otherwise as given."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation {formulation!r} is not one of {FORMULATIONS}")
    if formulation == "auto":
        return "explicit" if jax.default_backend() == "cpu" else "native"
    return formulation


def native_conv2d(x: jax.Array, kernel: jax.Array, stride: int, pads, groups: int) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)


def shifted_views(x: jax.Array, kh: int, kw: int, stride: int, out_h: int, out_w: int) -> list[jax.Array]:
    """The kh*kw strided windows of a padded x [B, H, W, C], each [B, out_h, out_w, C], row-major taps."""
    return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1,
                                        x.shape[3]), (1, stride, stride, 1))
            for i in range(kh) for j in range(kw)]


def explicit_conv2d(x: jax.Array, kernel: jax.Array, stride: int, pads, groups: int) -> jax.Array:
    kh, kw, cin_per_group, cout = kernel.shape
    cin = x.shape[-1]
    depthwise = groups == cin and cout == cin and cin_per_group == 1
    if groups != 1 and not depthwise:
        return native_conv2d(x, kernel, stride, pads, groups)
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    if depthwise:
        taps = kernel.reshape(kh * kw, cout)
        views = shifted_views(x, kh, kw, stride, out_h, out_w)
        out = views[0] * taps[0]
        for view, tap in zip(views[1:], taps[1:]):
            out = out + view * tap
        return out
    if kh == kw == 1:
        view = shifted_views(x, 1, 1, stride, out_h, out_w)[0]
        return jnp.einsum("bhwc,cd->bhwd", view, kernel[0, 0])
    patches = jnp.stack(shifted_views(x, kh, kw, stride, out_h, out_w), axis=3)  # [B, Ho, Wo, kh*kw, Cin]
    return jnp.einsum("bhwtc,tcd->bhwd", patches, kernel.reshape(kh * kw, cin, cout))


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: Padding = "SAME", groups: int = 1,
           formulation: str = "auto") -> jax.Array:
    """A 2-D convolution (cross-correlation, like lax and torch) of NHWC x with an HWIO kernel.

    Args:
      x: [B, H, W, Cin].
      kernel: [kh, kw, Cin / groups, Cout].
      stride: the same stride on both spatial axes.
      padding: 'SAME' (TF / lax rule: the odd pixel goes after), 'VALID', or explicit
        ((top, bottom), (left, right)) pixel counts.
      groups: feature groups; Cin for a depthwise convolution.
      formulation: 'auto' (explicit on CPU, native elsewhere), 'explicit' or 'native'.

    Returns:
      [B, Ho, Wo, Cout] in the dtype of x and kernel.
    """
    kh, kw, cin_per_group, _ = kernel.shape
    if x.shape[-1] != cin_per_group * groups:
        raise ValueError(f"input has {x.shape[-1]} channels; the kernel {kernel.shape} with groups={groups} "
                         f"expects {cin_per_group * groups}")
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), stride)
    if resolve_formulation(formulation) == "native":
        return native_conv2d(x, kernel, stride, pads, groups)
    return explicit_conv2d(x, kernel, stride, pads, groups)


NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def lax_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1, precision=None,
                             **kwargs) -> jax.Array:
    """`lax.conv_general_dilated`'s signature, computed by `conv2d` (formulation 'auto') where that applies.

    For `nnx.Conv(..., conv_general_dilated=lax_conv_general_dilated)`: the layer keeps its
    parameters (so checkpoints do not change) and runs the explicit formulation on CPU and the
    native convolution elsewhere. NHWC x HWIO 2-D convolutions with equal strides, no dilation,
    default precision and no other options take `conv2d`; anything else goes to lax unchanged.
    """
    undilated = all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
    nhwc = lhs.ndim == 4 and lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO) == \
        lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or NHWC_HWIO)
    plain = precision is None and all(v is None for v in kwargs.values())
    if undilated and nhwc and plain and len(set(window_strides)) == 1:
        pads = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        return conv2d(lhs, rhs, stride=int(window_strides[0]), padding=pads, groups=feature_group_count)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)


def with_convolutions(module, conv_fn):
    """A deep copy of the nnx `module` whose every nnx.Conv computes with `conv_fn`, a drop-in for
    lax.conv_general_dilated (same parameters); for comparing formulations in tests and benchmarks."""
    import copy

    from flax import nnx

    clone = copy.deepcopy(module)
    for _, sub in nnx.iter_graph(clone):
        if isinstance(sub, nnx.Conv):
            sub.conv_general_dilated = conv_fn
    return clone
