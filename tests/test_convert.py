"""HF CLIP import / export: parity with transformers' own CLIPModel (torch, CPU), round trip, bad checkpoints.

The reference is a tiny random transformers.CLIPModel whose every weight (LayerNorms and
biases included) is perturbed away from its init, so a mis-mapped tensor cannot hide.
"""

import json
import pathlib
import shutil
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from prodclip import cli, convert, optim  # noqa: E402
from prodclip.models import two_tower  # noqa: E402

TITLES = ["red cotton shirt, 2 pack", "blue jeans", "striped mug 350ml", "a"]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def tiny_clip_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer over a 84-token vocabulary; like OpenAI's, pad = eos = the largest id."""
    chars = list(string.ascii_lowercase + string.digits + ".,-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("e", "d</w>"), ("r", "ed</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


SHAPES = {
    # name: (vision kwargs, text kwargs, projection_dim)
    "quick_gelu-p4": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=4), dict(hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=128), 24),
    "gelu-p8-deep-text": (dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=144,
                               image_size=32, patch_size=8, hidden_act="gelu"),
                          dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                               hidden_act="gelu"), 16),
    "legacy-eos2-argmax": (dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=1, intermediate_size=64,
                                image_size=12, patch_size=6), dict(hidden_size=16, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=32,
                                                                   eos_token_id=2), 8),
}


def make_hf_clip(directory: pathlib.Path, shape: str, seed: int = 0):
    """Saves a tiny random CLIPModel + tokenizer to `directory`; returns (model, tokenizer)."""
    vision, text, proj = SHAPES[shape]
    tok = tiny_clip_tokenizer()
    text = {"vocab_size": len(tok), "max_position_embeddings": 16, "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id, **text}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj,
                                     logit_scale_init_value=2.3)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model, tok


def inputs(tok, image_size: int, context: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (3, image_size, image_size, 3)).astype(np.float32)
    enc = tok(TITLES, padding="max_length", max_length=context, truncation=True, return_tensors="np")
    return images, enc["input_ids"].astype(np.int32), enc["attention_mask"]


def hf_outputs(model, images, ids, attention_mask) -> dict[str, np.ndarray]:
    pixels = ((images / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(attention_mask),
                    pixel_values=torch.tensor(pixels, dtype=torch.float32))
        image_features = model.get_image_features(pixel_values=torch.tensor(pixels, dtype=torch.float32))
        text_features = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                                attention_mask=torch.tensor(attention_mask))
    features = lambda f: getattr(f, "pooler_output", f).numpy()
    return {"image_emb": out.image_embeds.numpy(), "text_emb": out.text_embeds.numpy(),
            "logits": out.logits_per_image.numpy(), "image_features": features(image_features),
            "text_features": features(text_features)}


def prodclip_outputs(config, params, images, ids) -> dict[str, np.ndarray]:
    build = lambda: two_tower.build_model(config, vocab_size=config.model.text.vocab_size, pad_id=0, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(nnx.eval_shape(build), nnx.Param)

    @jax.jit
    def forward(params, images, ids):
        model = nnx.merge(graphdef, nnx.State(params))
        out = model(images, ids)
        return {"image_emb": out["image_emb"], "text_emb": out["text_emb"],
                "logits": out["logit_scale"] * out["image_emb"] @ out["text_emb"].T,
                "image_features": model.image_tower(images)[0], "text_features": model.text_tower(ids)[0]}
    return jax.tree.map(np.asarray, forward(params, jnp.asarray(images), jnp.asarray(ids)))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_import_matches_transformers(tmp_path, shape):
    hf_model, tok = make_hf_clip(tmp_path, shape)
    config, params, tokenizer = convert.load_hf_clip(tmp_path)
    images, ids, attention_mask = inputs(tok, config.data.image_size, config.tokenizer.context_length)
    assert (ids == tok.eos_token_id).any(axis=1).all() and (ids == tok.pad_token_id).any()
    np.testing.assert_array_equal(tokenizer(TITLES), ids)
    expected = hf_outputs(hf_model, images, ids, attention_mask)
    ours = prodclip_outputs(config, params, images, ids)
    for key in expected:
        np.testing.assert_allclose(ours[key], expected[key], atol=1e-4, rtol=0, err_msg=key)
    assert config.model.text.eot_rule == ("argmax" if shape.startswith("legacy") else "eos_id")


def test_round_trip_through_the_cli(tmp_path):
    hf_dir, workdir, out_dir = tmp_path / "hf", tmp_path / "run", tmp_path / "exported"
    hf_model, tok = make_hf_clip(hf_dir, "quick_gelu-p4", seed=1)
    assert cli.main(["convert", "import", str(hf_dir), "--out", str(workdir)]) == 0
    assert (workdir / "config.json").exists() and (workdir / "tokenizer" / "tokenizer_config.json").exists()
    assert cli.main(["convert", "export", str(workdir), "--out", str(out_dir)]) == 0

    exported = transformers.CLIPModel.from_pretrained(out_dir).eval()
    images, ids, attention_mask = inputs(tok, 16, 16, seed=3)
    expected = hf_outputs(hf_model, images, ids, attention_mask)
    again = hf_outputs(exported, images, ids, attention_mask)
    for key in expected:
        np.testing.assert_allclose(again[key], expected[key], atol=1e-5, rtol=0, err_msg=key)
    reloaded = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    assert reloaded(TITLES)["input_ids"] == tok(TITLES)["input_ids"]
    processor = json.loads((out_dir / "preprocessor_config.json").read_text())
    np.testing.assert_allclose(processor["image_mean"], CLIP_MEAN, rtol=1e-6)


def test_imported_workdir_initialises_training(tmp_path):
    from prodclip import checkpoint, config_loading

    make_hf_clip(tmp_path / "hf", "legacy-eos2-argmax")
    convert.import_hf_clip(tmp_path / "hf", tmp_path / "run")
    config = config_loading.load_config_file(tmp_path / "run" / "config.json")
    assert config.model.init_checkpoint == str((tmp_path / "run").absolute())
    _, expected, _ = convert.load_hf_clip(tmp_path / "hf")
    like = convert.abstract_params(config, config.model.text.vocab_size, 0)
    restored = checkpoint.restore_params(config.model.init_checkpoint, like)
    for path, value in convert.flat_params(expected).items():
        np.testing.assert_array_equal(convert.flat_params(restored)[path], value, err_msg=path)
    # A model of another shape is refused, naming the parameter.
    config.model.text.width = 32
    with pytest.raises(ValueError, match=r"text_tower/encoder/blocks/0/attn/key/bias \(16,\) \(model: \(32,\)\)"):
        checkpoint.restore_params(config.model.init_checkpoint,
                                  convert.abstract_params(config, config.model.text.vocab_size, 0))
    assert optim.trainable_labels(restored, config)["log_logit_scale"] == "other"


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    make_hf_clip(directory, "quick_gelu-p4")
    return directory


def _corrupt(saved_clip, tmp_path, *, tensors=None, config=None) -> pathlib.Path:
    bad = tmp_path / "bad"
    shutil.copytree(saved_clip, bad)
    if tensors is not None:
        weights = load_file(str(bad / "model.safetensors"))
        tensors(weights)
        save_file(weights, str(bad / "model.safetensors"))
    if config is not None:
        raw = json.loads((bad / "config.json").read_text())
        config(raw)
        (bad / "config.json").write_text(json.dumps(raw))
    return bad


def test_missing_tensor_is_named(saved_clip, tmp_path):
    name = "text_model.encoder.layers.1.self_attn.k_proj.bias"
    bad = _corrupt(saved_clip, tmp_path, tensors=lambda w: w.pop(name))
    with pytest.raises(convert.CheckpointError, match=f"missing tensor '{name}'"):
        convert.load_hf_clip(bad)


def test_wrong_shape_is_named(saved_clip, tmp_path):
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    bad = _corrupt(saved_clip, tmp_path, tensors=lambda w: w.update({name: w[name][:, :16].copy()}))
    with pytest.raises(convert.CheckpointError, match=rf"tensor '{name}' has shape \(64, 16\); the config implies \(64, 32\)"):
        convert.load_hf_clip(bad)


def test_unexpected_tensor_is_named(saved_clip, tmp_path):
    bad = _corrupt(saved_clip, tmp_path, tensors=lambda w: w.update({"text_model.extra_head.weight": np.ones(3)}))
    with pytest.raises(convert.CheckpointError, match="text_model.extra_head.weight"):
        convert.load_hf_clip(bad)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["vision_config"].update(use_qk_norm=True), "unknown config field.*vision_config.use_qk_norm"),
    (lambda c: c.update(fancy_pooling="map"), "unknown config field.*fancy_pooling"),
    (lambda c: c["text_config"].update(hidden_act="relu"), "text_config.hidden_act='relu' is not supported"),
    (lambda c: c["vision_config"].update(layer_norm_eps=1e-6), "vision_config.layer_norm_eps"),
])
def test_bad_config_field_is_named(saved_clip, tmp_path, edit, message):
    with pytest.raises(convert.CheckpointError, match=message):
        convert.load_hf_clip(_corrupt(saved_clip, tmp_path, config=edit))


def test_export_refuses_incompatible_architectures(tmp_path):
    from prodclip import config as config_lib
    from prodclip import checkpoint

    config = config_lib.base_config()
    config.model.image.pooling = "map"
    config.model.text.mask = "bidirectional"
    config.model.text.pooling = "mean"
    checkpoint.write_config(tmp_path, config)
    with pytest.raises(convert.CheckpointError) as info:
        convert.export_hf_clip(tmp_path, tmp_path / "out")
    for option in ("model.image.pooling='map'", "model.image.posemb='sincos2d'", "model.image.pre_norm=False",
                   "model.image.patch_bias=True", "model.text.mask='bidirectional'", "model.text.pooling='mean'"):
        assert option in str(info.value)
    assert not (tmp_path / "out").exists()
