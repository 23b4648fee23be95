"""Model towers: shapes, masking, pooling, normalisation, and the patch embedding against a conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prodclip.models.text import TextTransformer
from prodclip.models.two_tower import TwoTower
from prodclip.models.vit import VisionTransformer

TINY = dict(width=32, depth=2, num_heads=2, mlp_ratio=2.0, embed_dim=16)


def vit(**kw):
    return VisionTransformer(image_size=32, patch_size=8, rngs=nnx.Rngs(0), **{**TINY, **kw})


def text(**kw):
    return TextTransformer(vocab_size=50, context_length=10, rngs=nnx.Rngs(1), **{**TINY, **kw})


@pytest.mark.parametrize("pooling", ["cls", "gap", "map"])
@pytest.mark.parametrize("posemb", ["sincos2d", "learn"])
def test_vit_shapes(pooling, posemb):
    images = jax.random.randint(jax.random.key(0), (3, 32, 32, 3), 0, 256).astype(jnp.uint8)
    emb, patches = vit(pooling=pooling, posemb=posemb)(images)
    assert emb.shape == (3, 16)
    assert patches.shape == (3, 16, 32)
    assert np.all(np.isfinite(emb))


def test_patch_embedding_equals_strided_conv():
    model = vit()
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    x = (images - np.asarray(model.pixel_mean)) / np.asarray(model.pixel_std)
    kernel = model.patch_embed.kernel[...].reshape(8, 8, 3, 32)  # (p1 p2 c) -> HWIO
    conv = jax.lax.conv_general_dilated(x, kernel, (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = conv.reshape(2, 16, 32) + model.patch_embed.bias[...]
    from einops import rearrange
    ours = model.patch_embed(rearrange(jnp.asarray(x), "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=8, p2=8))
    np.testing.assert_allclose(ours, conv, rtol=1e-5, atol=1e-5)


def _numpy_conv(x, kernel, bias, stride):
    """Reference conv in numpy: x [B, H, W, I], kernel [k, k, I, O]; 'SAME' padding for k=3, stride 2
    (pad 0 before, 1 after for even H) and 'VALID' for k = stride (a patchify)."""
    k = kernel.shape[0]
    b, h, w, _ = x.shape
    if k > stride:
        x = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    out = np.zeros((b, h // stride, w // stride, kernel.shape[-1]))
    for i in range(h // stride):
        for j in range(w // stride):
            window = x[:, stride * i:stride * i + k, stride * j:stride * j + k]
            out[:, i, j] = np.einsum("bhwi,hwio->bo", window, kernel)
    return out + bias


@pytest.mark.parametrize("stem_depth,strides", [(3, [2, 2, 2]), (2, [2, 2, 2]), (1, [4, 2])])
def test_conv_stem_matches_numpy_reference(stem_depth, strides):
    model = vit(stem="conv", stem_depth=stem_depth)
    stem = model.conv_stem
    assert [c.strides for c in stem.convs] in (strides, [(s, s) for s in strides])
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    h = x.astype(np.float64)
    for conv, norm, stride in zip(stem.convs, stem.norms, strides):
        h = _numpy_conv(h, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...]), stride)
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
        h = h * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
        h = np.asarray(jax.nn.gelu(h, approximate=False))
    h = h @ np.asarray(stem.out.kernel[...])[0, 0] + np.asarray(stem.out.bias[...])
    np.testing.assert_allclose(stem(jnp.asarray(x)), h.reshape(2, 16, 32), rtol=1e-4, atol=1e-4)
    emb, patches = model(jnp.zeros((2, 32, 32, 3), jnp.uint8))
    assert emb.shape == (2, 16) and patches.shape == (2, 16, 32)


@pytest.mark.parametrize("mask,pooling", [("causal", "eot"), ("bidirectional", "mean"), ("bidirectional", "cls"),
                                          ("causal", "mean"), ("bidirectional", "eot")])
def test_text_padding_does_not_change_embedding(mask, pooling):
    model = text(mask=mask, pooling=pooling)
    short = jnp.array([[2, 7, 9, 3, 0, 0, 0, 0, 0, 0]])
    model_out_a = model(short)[0]
    # Same tokens, padding filled with other ids beyond the length would differ, so compare with
    # a batch mate of different length: padding must not leak between positions or rows.
    batch = jnp.array([[2, 7, 9, 3, 0, 0, 0, 0, 0, 0], [2, 5, 6, 7, 8, 9, 11, 3, 0, 0]])
    np.testing.assert_allclose(model(batch)[0][0], model_out_a[0], rtol=1e-5, atol=1e-6)
    # Shorter context (no padding at all) gives the same embedding.
    np.testing.assert_allclose(model(short[:, :4])[0], model_out_a, rtol=1e-5, atol=1e-6)


def test_causal_mask_hides_the_future():
    model = text(mask="causal")
    a = jnp.array([[2, 7, 9, 3, 4, 5, 0, 0, 0, 0]])
    b = a.at[0, 4].set(12)
    states_a, states_b = model(a)[1], model(b)[1]
    np.testing.assert_allclose(states_a[0, :4], states_b[0, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(states_a[0, 4], states_b[0, 4])


def test_bidirectional_mask_sees_the_future():
    model = text(mask="bidirectional")
    a = jnp.array([[2, 7, 9, 3, 4, 5, 0, 0, 0, 0]])
    b = a.at[0, 4].set(12)
    assert not np.allclose(model(a)[1][0, 0], model(b)[1][0, 0])


def test_two_tower_normalised_and_clamped():
    model = TwoTower(vit(), text(), logit_scale_init=np.log(1000.0), logit_bias_init=-10.0, logit_scale_max=100.0)
    images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    ids = jnp.array([[2, 4, 3, 0, 0, 0, 0, 0, 0, 0]] * 2)
    out = model(images, ids)
    np.testing.assert_allclose(np.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_emb"], axis=-1), 1.0, rtol=1e-5)
    assert float(out["logit_scale"]) == pytest.approx(100.0)
    np.testing.assert_allclose(model.encode_image(images), out["image_emb"], rtol=1e-6)
    np.testing.assert_allclose(model.encode_text(ids), out["text_emb"], rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    model = vit(dtype=jnp.bfloat16)
    emb, _ = model(jnp.zeros((1, 32, 32, 3), jnp.uint8))
    assert emb.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
