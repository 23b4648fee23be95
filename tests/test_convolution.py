"""The explicit CPU convolution formulations against lax.conv_general_dilated.

Tolerance: 1e-5 absolute and relative in float32 (the two compute the same sums in a
different order). Also checks that 'SAME' padding follows the TF / torch-reference rule
(odd pixel after) and that the gradients agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from prodclip.models import convolution

CASES = [  # (kh, kw, cin, cout, groups)
    (3, 3, 6, 6, 6),  # depthwise 3x3
    (5, 5, 4, 4, 4),  # depthwise 5x5
    (1, 1, 5, 7, 1),  # pointwise
    (3, 3, 3, 8, 1),  # dense (the stem)
    (2, 2, 4, 3, 1),  # dense, even kernel
    (3, 3, 4, 6, 2),  # grouped: falls back to native
]
PADDINGS = ["SAME", "VALID", ((1, 2), (0, 1))]


def reference(x, kernel, stride, padding, groups):
    pads = padding if isinstance(padding, str) else list(padding)
    return lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups, precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("kh,kw,cin,cout,groups", CASES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", PADDINGS, ids=["same", "valid", "explicit"])
def test_explicit_matches_native(kh, kw, cin, cout, groups, stride, padding):
    rng = np.random.default_rng(kh * 100 + cin * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, cin)), jnp.float32)  # odd height, even width
    kernel = jnp.asarray(rng.normal(size=(kh, kw, cin // groups, cout)), jnp.float32)
    expected = reference(x, kernel, stride, padding, groups)
    got = convolution.conv2d(x, kernel, stride=stride, padding=padding, groups=groups, formulation="explicit")
    native = convolution.conv2d(x, kernel, stride=stride, padding=padding, groups=groups, formulation="native")
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(native), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,cout", [(4, 4), (1, 6)])
def test_explicit_gradients_match_native(groups, cout):
    rng = np.random.default_rng(groups)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4 // groups, cout)), jnp.float32)

    def loss(formulation):
        return lambda x, k: jnp.sum(jnp.sin(convolution.conv2d(x, k, stride=2, groups=groups,
                                                                formulation=formulation)))
    got = jax.grad(loss("explicit"), argnums=(0, 1))(x, kernel)
    expected = jax.grad(loss("native"), argnums=(0, 1))(x, kernel)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_same_padding_puts_the_odd_pixel_after():
    assert convolution.same_padding(128, 3, 2) == (0, 1)
    assert convolution.same_padding(65, 5, 2) == (2, 2)
    assert convolution.same_padding(8, 5, 2) == (1, 2)
    assert convolution.same_padding(7, 3, 1) == (1, 1)


def test_auto_is_explicit_on_cpu_and_bad_arguments_are_refused():
    assert convolution.resolve_formulation("auto") == ("explicit" if jax.default_backend() == "cpu" else "native")
    with pytest.raises(ValueError, match="formulation"):
        convolution.conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 2)), formulation="fast")
    with pytest.raises(ValueError, match="channels"):
        convolution.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 1, 2, 2)))
