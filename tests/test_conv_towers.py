"""The ViT conv stem and the ResNet tower on the explicit CPU convolutions equal XLA's native convolution.

Tolerance: 1e-5 absolute and relative on outputs and input/parameter gradients, float32 (the
two formulations compute the same sums in a different order). Also checks that on CPU the
explicit copy's jaxpr holds no `conv_general_dilated` (the explicit formulation is the one
taken) and the native copy's does, and which one each tower uses by default on CPU.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from prodclip.models import convolution, resnet, vit


def primitives(fn, *args) -> set[str]:
    found = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            found.add(eqn.primitive.name)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    visit(inner)
    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def assert_same_function(module, x, output=lambda y: y):
    """Outputs and gradients (w.r.t. x and every parameter) of `module` on the explicit CPU convolutions and on
    the native ones agree at 1e-5."""
    graphdef, params = nnx.split(convolution.with_convolutions(module, convolution.lax_conv_general_dilated))
    native_graphdef, _ = nnx.split(convolution.with_convolutions(module, lax.conv_general_dilated))
    cotangent_key = jax.random.key(7)

    def loss(graphdef):
        def f(params, x):
            y = output(nnx.merge(graphdef, params)(x))
            return jnp.sum(y * jax.random.normal(cotangent_key, y.shape)), y
        return f

    assert "conv_general_dilated" not in primitives(loss(graphdef), params, x)
    assert "conv_general_dilated" in primitives(loss(native_graphdef), params, x)
    with jax.default_matmul_precision("highest"):
        (_, got), got_grads = jax.jit(jax.value_and_grad(loss(graphdef), argnums=(0, 1), has_aux=True))(params, x)
        (_, want), want_grads = jax.jit(jax.value_and_grad(loss(native_graphdef), argnums=(0, 1), has_aux=True))(
            params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        scale = max(1.0, float(np.max(np.abs(np.asarray(b)))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_conv_stem_explicit_equals_native():
    """The quickstart's stem: 4x4 patchify, two 3x3 stride-2 convs, 1x1."""
    stem = vit.ConvStem(16, 32, nnx.Rngs(0), depth=2)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    assert_same_function(stem, x)


@pytest.mark.parametrize("block_cls,cin,width,stride", [(resnet.BasicBlock, 8, 16, 2),
                                                        (resnet.BottleneckBlock, 16, 8, 2)])
def test_resnet_block_explicit_equals_native(block_cls, cin, width, stride):
    block = block_cls(cin, width, stride, 4, nnx.Rngs(0), jnp.float32)
    for _, sub in nnx.iter_graph(block):  # non-zero last norm, so the residual branch counts
        if isinstance(sub, nnx.GroupNorm):
            sub.scale[...] = jnp.full(sub.scale.shape, 0.7)
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, cin))
    assert_same_function(block, x)


def test_resnet_tower_explicit_equals_native():
    """The whole tower, 7x7 stride-2 stem conv included, on uint8 images."""
    tower = resnet.ResNet(depth=18, width_mult=0.125, embed_dim=16, norm_groups=4, rngs=nnx.Rngs(0))
    images = jax.random.randint(jax.random.key(2), (2, 32, 32, 3), 0, 256).astype(jnp.float32)
    assert_same_function(tower, images, output=lambda out: out[0])


def test_cpu_default_formulations():
    """On CPU the ResNet tower takes the explicit convolutions; the ViT conv stem keeps XLA's native ones
    (its explicit form measured slower on CPU, docs/performance.md)."""
    assert jax.default_backend() == "cpu"
    tower = resnet.ResNet(depth=18, width_mult=0.125, embed_dim=16, norm_groups=4, rngs=nnx.Rngs(0))
    stem = vit.ConvStem(16, 32, nnx.Rngs(0), depth=2)
    for module, size, explicit in ((tower, 32, True), (stem, 32, False)):
        graphdef, params = nnx.split(module)
        x = jnp.zeros((1, size, size, 3))
        assert ("conv_general_dilated" not in primitives(lambda p, x: nnx.merge(graphdef, p)(x), params, x)) == explicit
