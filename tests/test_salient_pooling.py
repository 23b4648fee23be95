"""Saliency-weighted pooling: cell centres under TF 'SAME' padding, carried weights, colour histograms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prodclip.models import convolution, efficientnet, salient_pooling


@pytest.mark.parametrize("size", [32, 37])
def test_conv_centres_are_where_the_centre_tap_of_each_convolution_reads(size):
    convs = [(3, 2), (5, 2), (3, 1), (5, 2)]
    x = np.arange(size * size, dtype=np.float32).reshape(1, size, size, 1)
    y = jnp.asarray(x)
    for kernel, stride in convs:  # a kernel that copies its centre tap: each cell reads the pixel it is centred on
        tap = np.zeros((kernel, kernel, 1, 1), np.float32)
        tap[kernel // 2, kernel // 2] = 1.0
        y = convolution.conv2d(y, jnp.asarray(tap), stride=stride, padding="SAME", groups=1, formulation="native")
    centres = salient_pooling.conv_centres(size, convs)
    assert np.allclose(centres, np.round(centres))
    index = centres.astype(int)
    np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], x[0, index][:, index, 0])


def test_the_final_map_of_a_192_px_lite0_is_centred_half_a_cell_after_a_resize_s_guess():
    convs = efficientnet.EfficientNetLite("efficientnet_lite0", nnx.Rngs(0)).spatial_convs
    np.testing.assert_allclose(salient_pooling.conv_centres(192, convs), 32 * np.arange(6) + 31)


def test_interpolation_matrix_is_identity_on_the_grid_linear_between_and_clamped_outside():
    source = np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(salient_pooling.interpolation_matrix(source, source), np.eye(3))
    m = salient_pooling.interpolation_matrix(np.array([0.0, 2.0, 4.5, 9.0]), source)
    np.testing.assert_allclose(m, [[1, 0, 0], [0.5, 0.5, 0], [0, 0.25, 0.75], [0, 0, 1]])


def test_one_active_cell_carries_its_weight_to_the_pixels_around_its_centre():
    convs = efficientnet.EfficientNetLite("efficientnet_lite0", nnx.Rngs(0)).spatial_convs
    weights = np.zeros((1, 6, 6), np.float32)
    weights[0, 2, 3] = 1.0
    carried = np.asarray(salient_pooling.carried_weights(jnp.asarray(weights), (192, 192), convs, []))
    assert carried.shape == (1, 192, 192) and carried.sum() == pytest.approx(1.0, abs=1e-5)
    grid = np.arange(192)
    assert (carried[0].sum(1) * grid).sum() == pytest.approx(32 * 2 + 31, abs=1e-3)  # row centroid
    assert (carried[0].sum(0) * grid).sum() == pytest.approx(32 * 3 + 31, abs=1e-3)  # column centroid


def test_saliency_shares_the_norm_is_uniform_on_a_zero_map_and_passes_no_gradient():
    final_map = np.zeros((2, 2, 2, 8), np.float32)
    final_map[0, 0, 1] = 3.0
    final_map[0, 1, 0] = 1.0
    weights = np.asarray(salient_pooling.saliency(final_map))
    np.testing.assert_allclose(weights[0], [[0, 0.75], [0.25, 0]], atol=1e-6)
    np.testing.assert_allclose(weights[1], np.full((2, 2), 0.25))
    grad = jax.grad(lambda m: (salient_pooling.saliency(m) * jnp.arange(8.0).reshape(2, 2, 2)).sum())(final_map)
    assert np.all(np.asarray(grad) == 0)


def test_colour_histogram_counts_the_weighted_cells():
    pixels = np.zeros((1, 4, 4, 3), np.float32)
    pixels[0, :2] = (255, 0, 0)  # top half red, bottom half black
    weights = np.zeros((1, 4, 4), np.float32)
    weights[0, 0, 0], weights[0, 3, 3] = 0.75, 0.25
    hist = np.asarray(salient_pooling.colour_histogram(pixels, weights, bins=6))
    red, black = 5 * 36, 0
    assert hist[0, red] == pytest.approx(0.75) and hist[0, black] == pytest.approx(0.25) and hist.sum() == pytest.approx(1)
