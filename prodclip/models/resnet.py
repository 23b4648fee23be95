"""ResNet image tower: conv stem -> residual stages -> pooled, projected embedding.

Same interface as the ViT (vit.py): uint8 images on a 0..255 scale in, (embedding, feature
tokens) out, so `model.image.kind = "resnet"` swaps it in anywhere.

Normalisation is GroupNorm, not BatchNorm. GroupNorm's statistics are per example, so the
tower is a pure function of each image: the sharded step (batch split over devices), the pmap
step, GradCache micro-batches and evaluation all compute exactly the same thing, with no
running statistics in the train state and no cross-device sync. BatchNorm would need
batch statistics synced across the mesh and a separate eval mode.

Shapes: B batch, S image side, C channels. Depths follow He et al. (2016): 18 uses basic
blocks [2, 2, 2, 2]; 26 bottleneck blocks [2, 2, 2, 2]; 50 bottleneck blocks [3, 4, 6, 3].
Down-sampling sits on the 3x3 convolution of a bottleneck ("ResNet v1.5").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prodclip.models import convolution, layers
from prodclip.models.vit import PIXEL_MEAN, PIXEL_STATS, PIXEL_STD

# depth -> (block kind, blocks per stage)
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 26: ("bottleneck", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
BOTTLENECK_EXPANSION = 4
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # He init for ReLU networks


def stage_channels(depth: int, width_mult: float) -> tuple[int, list[int]]:
    """(stem channels, output channels of each stage) for a depth and width multiplier."""
    base = int(round(64 * width_mult))
    kind, _ = DEPTHS[depth]
    expansion = BOTTLENECK_EXPANSION if kind == "bottleneck" else 1
    return base, [base * 2 ** i * expansion for i in range(4)]


def _conv(cin, cout, kernel, stride, rngs, dtype):
    # The explicit formulation on CPU, XLA's native convolution elsewhere (models/convolution.py).
    return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride), padding="SAME", use_bias=False,
                    kernel_init=CONV_INIT, dtype=dtype, conv_general_dilated=convolution.lax_conv_general_dilated,
                    rngs=rngs)


def _norm(channels, groups, rngs, dtype, zero_scale=False):
    scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-5, scale_init=scale_init, dtype=dtype, rngs=rngs)


class Shortcut(nnx.Module):
    """1x1 strided convolution + GroupNorm, where a block changes shape."""

    def __init__(self, cin, cout, stride, groups, rngs, dtype):
        self.conv = _conv(cin, cout, 1, stride, rngs, dtype)
        self.norm = _norm(cout, groups, rngs, dtype)

    def __call__(self, x):
        return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
    """relu(x + norm(conv3x3(relu(norm(conv3x3(x)))))); the last norm's scale starts at zero."""

    def __init__(self, cin, width, stride, groups, rngs, dtype):
        self.conv1 = _conv(cin, width, 3, stride, rngs, dtype)
        self.norm1 = _norm(width, groups, rngs, dtype)
        self.conv2 = _conv(width, width, 3, 1, rngs, dtype)
        self.norm2 = _norm(width, groups, rngs, dtype, zero_scale=True)
        self.shortcut = Shortcut(cin, width, stride, groups, rngs, dtype) if (stride != 1 or cin != width) else None

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class BottleneckBlock(nnx.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), each with GroupNorm; residual, ReLU."""

    def __init__(self, cin, width, stride, groups, rngs, dtype):
        cout = width * BOTTLENECK_EXPANSION
        self.conv1 = _conv(cin, width, 1, 1, rngs, dtype)
        self.norm1 = _norm(width, groups, rngs, dtype)
        self.conv2 = _conv(width, width, 3, stride, rngs, dtype)
        self.norm2 = _norm(width, groups, rngs, dtype)
        self.conv3 = _conv(width, cout, 1, 1, rngs, dtype)
        self.norm3 = _norm(cout, groups, rngs, dtype, zero_scale=True)
        self.shortcut = Shortcut(cin, cout, stride, groups, rngs, dtype) if (stride != 1 or cin != cout) else None

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = jax.nn.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
    """Image tower.

    Args:
      depth: 18, 26 or 50 (see DEPTHS).
      width_mult: channel multiplier; the stem has round(64 * width_mult) channels.
      embed_dim: output embedding size.
      pooling: 'gap' (mean over the final feature map) or 'map' (attention pooling, as CLIP's ResNets).
      norm_groups: GroupNorm groups; must divide every channel count.
      pool_heads, mlp_ratio, activation: the attention pool's shape (pooling='map').
      pixel_mean, pixel_std: per-channel statistics on a 0..255 scale.
    """

    def __init__(self, *, depth, width_mult, embed_dim, rngs: nnx.Rngs, pooling="gap", norm_groups=32,
                 pool_heads=8, mlp_ratio=4.0, activation="gelu", proj_bias=False,
                 pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD, dtype=jnp.float32, remat=False):
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(DEPTHS)}")
        if pooling not in ("gap", "map"):
            raise ValueError(f"ResNet pooling {pooling!r} is not one of 'gap', 'map'")
        kind, blocks_per_stage = DEPTHS[depth]
        block_cls = BasicBlock if kind == "basic" else BottleneckBlock
        stem, outs = stage_channels(depth, width_mult)
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.dtype = dtype
        self.pooling = pooling
        self.remat = remat
        self.stem_conv = _conv(3, stem, 7, 2, rngs, dtype)
        self.stem_norm = _norm(stem, norm_groups, rngs, dtype)
        blocks, cin = [], stem
        for i, count in enumerate(blocks_per_stage):
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(cin, stem * 2 ** i, stride, norm_groups, rngs, dtype))
                cin = outs[i]
        self.blocks = nnx.List(blocks)
        self.width = outs[-1]
        self.map_head = (layers.AttentionPool(self.width, pool_heads, mlp_ratio, rngs, activation=activation,
                                              dtype=dtype) if pooling == "map" else None)
        self.projection = layers.dense(self.width, embed_dim, rngs, dtype=dtype, use_bias=proj_bias)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images: [B, S, S, 3], uint8 or float on a 0..255 scale.

        Returns (embedding [B, embed_dim] not normalised, feature tokens [B, (S/32)², width]).
        """
        x = (images.astype(jnp.float32) - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
        x = jax.nn.relu(self.stem_norm(self.stem_conv(x.astype(self.dtype))))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = nnx.remat(lambda blk, h: blk(h))(block, x) if self.remat else block(x)
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        pooled = self.map_head(tokens) if self.pooling == "map" else tokens.mean(axis=1)
        return self.projection(pooled), tokens


def build_resnet(config, dtype, rngs: nnx.Rngs) -> ResNet:
    """The ResNet image tower of `config.model` (model.image.kind='resnet')."""
    m = config.model
    r = m.image.resnet
    pixel_mean, pixel_std = PIXEL_STATS[m.image.pixel_norm]
    return ResNet(depth=r.depth, width_mult=r.width_mult, embed_dim=m.embed_dim, pooling=m.image.pooling,
                  norm_groups=r.norm_groups, pool_heads=r.pool_heads, mlp_ratio=m.image.mlp_ratio,
                  activation=m.image.activation, proj_bias=m.image.proj_bias, pixel_mean=pixel_mean,
                  pixel_std=pixel_std, dtype=dtype, remat=m.remat, rngs=rngs)
