"""ResNet image tower: forward pass against a torch reference, and the sharded step on 8 fake CPU devices.

Tolerances: the forward pass within 1e-4 of a torch.nn.functional re-implementation (float32;
only reduction orders differ); the sharded step as tests/test_parallel.py states (loss and grad
norm rtol 1e-5, gradients rtol 1e-4, params and Adam moments rtol 1e-4 / atol 1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from multihost_worker import tiny_config, tiny_model
from test_parallel import assert_same_training, one_device_mesh, run_steps

from prodclip import parallel
from prodclip.config import ConfigError
from prodclip.models import resnet
from prodclip.models.vit import PIXEL_MEAN, PIXEL_STD

torch = pytest.importorskip("torch")
F = torch.nn.functional

RESNET = {"model.image.kind": "resnet", "model.image.resnet.depth": 18, "model.image.resnet.width_mult": 0.125,
          "model.image.resnet.norm_groups": 4}


# ----------------------------------------------------------------------------- torch reference


def same_pad(x, kernel, stride, value=0.0):
    """TF/JAX 'SAME' padding (the extra row/column goes after), on an NCHW tensor."""
    pads = []
    for size in (x.shape[3], x.shape[2]):
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def t(a):
    return torch.as_tensor(np.asarray(a))


def conv(x, p, stride):
    w = t(p["kernel"]).permute(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
    return F.conv2d(same_pad(x, w.shape[-1], stride), w, stride=stride)


def gn(x, p, groups):
    return F.group_norm(x, groups, t(p["scale"]), t(p["bias"]), eps=1e-5)


def torch_block(x, p, groups, stride):
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block; the first 3x3 conv carries the stride."""
    names = sorted(k for k in p if k.startswith("conv"))
    first_3x3 = next(n for n in names if p[n]["kernel"].shape[0] == 3)
    y = x
    for i, name in enumerate(names):
        y = gn(conv(y, p[name], stride if name == first_3x3 else 1), p[f"norm{i + 1}"], groups)
        if i < len(names) - 1:
            y = F.relu(y)
    shortcut = x if "shortcut" not in p else gn(conv(x, p["shortcut"]["conv"], stride), p["shortcut"]["norm"], groups)
    return F.relu(y + shortcut)


def torch_resnet(params, images, depth, groups):
    """The tower's forward pass written with torch.nn.functional (gap pooling)."""
    x = (t(images).float() - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    x = x.permute(0, 3, 1, 2)
    x = F.relu(gn(conv(x, params["stem_conv"], 2), params["stem_norm"], groups))
    x = F.max_pool2d(same_pad(x, 3, 2, value=-np.inf), 3, 2)
    _, per_stage = resnet.DEPTHS[depth]
    strides = [2 if (i > 0 and j == 0) else 1 for i, n in enumerate(per_stage) for j in range(n)]
    for i, stride in enumerate(strides):
        x = torch_block(x, params["blocks"][i], groups, stride)
    pooled = x.mean(dim=(2, 3))
    return (pooled @ t(params["projection"]["kernel"])).numpy(), x


@pytest.mark.parametrize("depth,size", [(18, 32), (26, 24)])
def test_forward_matches_torch_reference(depth, size):
    model = resnet.ResNet(depth=depth, width_mult=0.125, embed_dim=6, norm_groups=4, rngs=nnx.Rngs(depth))
    graphdef, state = nnx.split(model, nnx.Param)
    # Re-draw every GroupNorm scale/bias (some start at zero), so every block's residual branch counts.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.normal(1.0, 0.3, x.shape) if path[-1].key == "scale" else
                         rng.normal(0.0, 0.3, x.shape) if path[-1].key == "bias" else np.asarray(x)).astype(np.float32),
        state.to_pure_dict())
    images = rng.integers(0, 256, (3, size, size, 3)).astype(np.uint8)
    emb, tokens = jax.jit(lambda p, x: nnx.merge(graphdef, nnx.State(p))(x))(params, images)
    expected_emb, expected_map = torch_resnet(params, images, depth, 4)
    expected_tokens = expected_map.permute(0, 2, 3, 1).reshape(3, -1, expected_map.shape[1]).numpy()
    np.testing.assert_allclose(np.asarray(tokens), expected_tokens, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(emb), expected_emb, atol=1e-4, rtol=1e-4)
    assert tokens.shape[-1] == resnet.stage_channels(depth, 0.125)[1][-1]


def test_attention_pooling_and_stage_widths():
    model = resnet.ResNet(depth=26, width_mult=0.125, embed_dim=5, pooling="map", norm_groups=4, pool_heads=4,
                          rngs=nnx.Rngs(0))
    emb, tokens = model(jnp.zeros((2, 64, 64, 3), jnp.uint8))
    assert emb.shape == (2, 5) and tokens.shape == (2, 4, 256)  # 64 px / 32 = 2 x 2 map of 8 * 8 * 4 channels
    assert len(model.blocks) == 8 and resnet.stage_channels(50, 0.125) == (8, [32, 64, 128, 256])
    assert resnet.stage_channels(18, 0.5) == (32, [32, 64, 128, 256])


@pytest.mark.parametrize("overrides,message", [
    ({"model.image.pooling": "cls"}, "pools with 'gap' or 'map'"),
    ({"model.image.resnet.norm_groups": 3}, "norm_groups=3 must divide"),
    ({"model.image.resnet.depth": 34}, "depth=34 is not one of"),
    ({"model.image.pooling": "map", "model.image.resnet.pool_heads": 5}, "pool_heads=5"),
])
def test_bad_resnet_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{**RESNET, **overrides})


# ----------------------------------------------------------------------------- the sharded step


@pytest.fixture(scope="module")
def resnet_reference():
    config = tiny_config(**RESNET)
    return run_steps(config, one_device_mesh(config), num_steps=2)


def test_resnet_sharded_step_matches_one_device(resnet_reference):
    """A 2 (data) x 4 (fsdp) mesh: the batch split 8 ways, conv kernels split 4 ways."""
    mesh_shape = (2, 4)
    config = tiny_config(**RESNET, **{"parallel.mesh_shape": mesh_shape})
    mesh = parallel.make_mesh(config)
    assert mesh.devices.size == 8
    _, params, _, state = tiny_model(config)
    assert "blocks" in params["image_tower"]  # the ResNet, not a cached ViT
    specs = jax.tree.leaves(parallel.tree_shardings(state, mesh, config.parallel.fsdp_min_size)["params"]["image_tower"])
    assert any("fsdp" in s.spec for s in specs), "no conv kernel is FSDP-sharded"
    states, history = run_steps(config, mesh, num_steps=2)
    assert_same_training(config, states, history, *resnet_reference, what=f"resnet mesh {mesh_shape}")
    assert history[1]["loss"] != pytest.approx(history[0]["loss"], rel=1e-3)  # it trains
