"""Import and export Hugging Face / OpenAI CLIP checkpoints (transformers' CLIPModel layout).

    prodclip convert import HF_DIR --out WORKDIR    # config.json + model.safetensors -> a prodclip workdir
    prodclip convert export WORKDIR --out HF_DIR    # a prodclip workdir -> CLIPModel.from_pretrained(HF_DIR)

An imported model is a normal prodclip run: WORKDIR holds config.json, tokenizer/ and an
orbax checkpoint (step 0), so `prodclip eval --workdir WORKDIR` evaluates it and
`prodclip train --config WORKDIR/config.json --workdir NEW` fine-tunes it (the saved
config names WORKDIR in model.init_checkpoint).

The two layouts differ only in names and in how a dense layer is stored: torch Linear
weights are [out, in], our kernels [in, out]; the patch Conv2d weight [out, 3, p, p] is
our patch kernel [(p p 3), out]. No torch is needed unless the checkpoint is a .bin.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from prodclip import checkpoint, config_checks, config_loading, errors, optim, trees
from prodclip import config as config_lib
from prodclip.data import tokenizer as tokenizer_lib
from prodclip.models import two_tower
from prodclip.models.vit import PIXEL_STATS


class CheckpointError(errors.CheckpointError):
    """A checkpoint or its config cannot be converted; the message names the tensor or field."""


_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # HF hidden_act -> prodclip activation

# Fields a CLIP config.json may hold that change nothing in the forward pass: generic
# PretrainedConfig bookkeeping, and generation defaults older transformers wrote into every config.
INERT_FIELDS = {
    "_name_or_path", "_commit_hash", "architectures", "transformers_version", "model_type", "torch_dtype", "dtype",
    "initializer_factor", "initializer_range", "attention_dropout", "dropout", "use_bfloat16", "torchscript",
    "tie_word_embeddings", "tie_encoder_decoder", "pruned_heads", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "chunk_size_feed_forward", "finetuning_task",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params", "return_dict",
    "output_attentions", "output_hidden_states", "output_scores", "return_dict_in_generate", "sep_token_id",
    "text_config_dict", "vision_config_dict", "logit_scale_init_value", "projection_dim",
    "text_config", "vision_config", "gradient_checkpointing",
}


def _known_fields() -> dict[str, set[str]]:
    generation = set(transformers.GenerationConfig().to_dict())
    clip = transformers.CLIPConfig()
    return {
        "": set(clip.to_dict()) | INERT_FIELDS | generation,
        "text_config": set(clip.text_config.to_dict()) | INERT_FIELDS | generation,
        "vision_config": set(clip.vision_config.to_dict()) | INERT_FIELDS | generation,
    }


# ----------------------------------------------------------------------------- the name table


def tensor_table(depth_image: int, depth_text: int) -> list[tuple[str, tuple, str]]:
    """(HF tensor name, prodclip param path, kind) for every CLIP weight.

    kind: 'copy' (same array), 'linear' (torch [out, in] = kernel.T) or 'patch' (conv weight).
    """
    table = []

    def block(hf: str, ours: tuple) -> None:
        for hf_name, our_name in (("self_attn.q_proj", "attn/query"), ("self_attn.k_proj", "attn/key"),
                                  ("self_attn.v_proj", "attn/value"), ("self_attn.out_proj", "attn/out"),
                                  ("mlp.fc1", "mlp/fc1"), ("mlp.fc2", "mlp/fc2")):
            path = ours + tuple(our_name.split("/"))
            table.append((f"{hf}.{hf_name}.weight", path + ("kernel",), "linear"))
            table.append((f"{hf}.{hf_name}.bias", path + ("bias",), "copy"))
        for hf_name, our_name in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
            table.extend(layer_norm(f"{hf}.{hf_name}", ours + (our_name,)))

    def layer_norm(hf: str, ours: tuple) -> list:
        return [(f"{hf}.weight", ours + ("scale",), "copy"), (f"{hf}.bias", ours + ("bias",), "copy")]

    v, t = "vision_model", "text_model"
    table += [
        (f"{v}.embeddings.class_embedding", ("image_tower", "cls_token"), "copy"),
        (f"{v}.embeddings.patch_embedding.weight", ("image_tower", "patch_embed", "kernel"), "patch"),
        (f"{v}.embeddings.position_embedding.weight", ("image_tower", "pos_embed"), "copy"),
        *layer_norm(f"{v}.pre_layrnorm", ("image_tower", "pre_norm")),
        *layer_norm(f"{v}.post_layernorm", ("image_tower", "encoder", "norm")),
        ("visual_projection.weight", ("image_tower", "projection", "kernel"), "linear"),
        (f"{t}.embeddings.token_embedding.weight", ("text_tower", "token_embed", "embedding"), "copy"),
        (f"{t}.embeddings.position_embedding.weight", ("text_tower", "pos_embed"), "copy"),
        *layer_norm(f"{t}.final_layer_norm", ("text_tower", "encoder", "norm")),
        ("text_projection.weight", ("text_tower", "projection", "kernel"), "linear"),
        ("logit_scale", ("log_logit_scale",), "copy"),
    ]
    for i in range(depth_image):
        block(f"{v}.encoder.layers.{i}", ("image_tower", "encoder", "blocks", i))
    for i in range(depth_text):
        block(f"{t}.encoder.layers.{i}", ("text_tower", "encoder", "blocks", i))
    return table


def to_ours(array: np.ndarray, kind: str, patch_size: int) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "patch":  # [out, c, p1, p2] -> [(p1 p2 c), out]
        return array.transpose(2, 3, 1, 0).reshape(patch_size * patch_size * array.shape[1], array.shape[0])
    return array


def _to_hf(array: np.ndarray, kind: str, patch_size: int) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "patch":  # [(p1 p2 c), out] -> [out, c, p1, p2]
        return array.reshape(patch_size, patch_size, -1, array.shape[1]).transpose(3, 2, 0, 1)
    return array


# ----------------------------------------------------------------------------- reading a HF directory


def read_hf_config(hf_dir: pathlib.Path) -> dict:
    """config.json as a dict; fields prodclip does not know are an error naming them."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a HF CLIP directory holds config.json and model.safetensors")
    raw = json.loads(path.read_text())
    if raw.get("model_type", "clip") != "clip":
        raise CheckpointError(f"{path}: model_type {raw['model_type']!r} is not 'clip'")
    known = _known_fields()
    for section, fields in known.items():
        tree = raw.get(section) or {} if section else raw
        unknown = sorted(set(tree) - fields)
        if unknown:
            where = f"{section}." if section else ""
            raise CheckpointError(
                f"{path}: unknown config field(s) {', '.join(where + u for u in unknown)}; prodclip cannot tell "
                f"whether they change the architecture. Known fields: {', '.join(sorted(fields - INERT_FIELDS))}")
    return transformers.CLIPConfig.from_dict(raw).to_dict()


def read_hf_tensors(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors (or its shards, or pytorch_model.bin with torch) as numpy arrays."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return dict(load_file(str(single)))
    if index.is_file():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(str(hf_dir / shard)))
        return tensors
    bin_path = hf_dir / "pytorch_model.bin"
    if bin_path.is_file():
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"{bin_path} needs torch to read; convert it to model.safetensors or "
                                  f"`pip install torch==2.13.0`") from e
        state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise CheckpointError(f"no weights in {hf_dir}: expected model.safetensors, model.safetensors.index.json "
                          f"or pytorch_model.bin")


def _field(section: dict, name: str, where: str):
    if name not in section:
        raise CheckpointError(f"config.json: missing field {where}{name}")
    return section[name]


def config_from_hf(hf: dict, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A prodclip config whose model is the HF CLIP described by `hf` (CLIPConfig.to_dict())."""
    config = base_config_unlocked(base)
    text, vision = hf["text_config"], hf["vision_config"]
    for where, section in (("text_config.", text), ("vision_config.", vision)):
        act = _field(section, "hidden_act", where)
        if act not in _ACTIVATIONS:
            raise CheckpointError(f"config.json: {where}hidden_act={act!r} is not supported; valid: "
                                  f"{', '.join(_ACTIVATIONS)}")
        eps = _field(section, "layer_norm_eps", where)
        if not math.isclose(eps, 1e-5, rel_tol=1e-6):
            raise CheckpointError(f"config.json: {where}layer_norm_eps={eps} is not supported (prodclip uses 1e-5)")
        width, hidden = _field(section, "hidden_size", where), _field(section, "intermediate_size", where)
        if int(width * (hidden / width)) != hidden:
            raise CheckpointError(f"config.json: {where}intermediate_size={hidden} is not expressible as a "
                                  f"ratio of hidden_size={width}")
    if vision.get("num_channels", 3) != 3:
        raise CheckpointError(f"config.json: vision_config.num_channels={vision['num_channels']}; only 3 is supported")
    eos = text.get("eos_token_id")
    if not isinstance(eos, int):
        raise CheckpointError(f"config.json: text_config.eos_token_id={eos!r} must be one int (the pooling token)")

    m = config.model
    m.embed_dim = _field(hf, "projection_dim", "")
    m.image.update(dict(
        preset="mu", width=vision["hidden_size"], depth=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"], mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
        patch_size=vision["patch_size"], posemb="learn", pooling="cls", pre_norm=True,
        activation=_ACTIVATIONS[vision["hidden_act"]], proj_bias=False, patch_bias=False, pixel_norm="clip"))
    m.text.update(dict(
        preset="mu", width=text["hidden_size"], depth=text["num_hidden_layers"],
        num_heads=text["num_attention_heads"], mlp_ratio=text["intermediate_size"] / text["hidden_size"],
        mask="causal", pooling="eot", activation=_ACTIVATIONS[text["hidden_act"]], proj_bias=False,
        eot_rule="argmax" if eos == 2 else "eos_id", eos_id=eos, vocab_size=text["vocab_size"]))
    m.logit_scale_max = 100.0
    config.data.image_size = vision["image_size"]
    config.tokenizer.context_length = text["max_position_embeddings"]
    config.tokenizer.lowercase = False  # the CLIP tokenizer normalises text itself
    config.lock()
    return config


def base_config_unlocked(base: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    return config_lib.base_config() if base is None else copy.deepcopy(base)


def abstract_params(config: ml_collections.ConfigDict, vocab_size: int, pad_id: int) -> dict:
    """The model's parameter tree as ShapeDtypeStructs (nothing is initialised)."""
    build = lambda: nnx.split(two_tower.build_model(config, vocab_size=vocab_size, pad_id=pad_id,
                                                     rngs=nnx.Rngs(0)), nnx.Param)[1].to_pure_dict()
    return jax.eval_shape(build)


def params_from_hf(tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict, like: dict) -> dict:
    """Our params (nested dict of float32 arrays, the structure of `like`) from HF tensors.

    Every tensor the table names must be present with the right shape; tensors the
    table does not name are an error too (except position_ids buffers).
    """
    m = config.model
    table = tensor_table(m.image.depth, m.text.depth)
    unexpected = sorted(set(tensors) - {name for name, _, _ in table}
                        - {n for n in tensors if n.endswith("embeddings.position_ids")})
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) a CLIPModel does not have: {', '.join(unexpected[:10])}")
    flat = {("logit_bias",): np.asarray(m.logit_bias_init, np.float32)}  # CLIP has none; used by sigmoid losses
    for name, path, kind in table:
        if name not in tensors:
            raise CheckpointError(f"missing tensor {name!r} (for prodclip param {'/'.join(map(str, path))})")
        value = to_ours(np.asarray(tensors[name], np.float32), kind, m.image.patch_size)
        expected = get_path(like, path).shape
        if value.shape != tuple(expected):
            hf_shape = tuple(_to_hf(np.empty(expected), kind, m.image.patch_size).shape)
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; the config "
                                  f"implies {hf_shape}")
        flat[path] = value
    ours = jax.tree_util.tree_map_with_path(lambda p, _: flat.get(trees.path_keys(p)), like)
    missing = [k for k, v in flat_params(ours).items() if v is None]
    if missing:
        raise CheckpointError(f"prodclip params with no HF tensor: {missing}")
    return ours


def get_path(tree: dict, path: tuple):
    """tree[path[0]][path[1]]...: the leaf at a `trees.path_keys` path."""
    for key in path:
        tree = tree[key]
    return tree


def flat_params(tree: dict) -> dict[str, Any]:
    """{'text_tower/.../kernel': leaf} for every leaf of `tree` (None leaves included)."""
    return {"/".join(map(str, trees.path_keys(p))): v
            for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)}


def load_hf_clip(hf_dir: str | pathlib.Path, base: ml_collections.ConfigDict | None = None):
    """Reads a HF CLIP directory: (prodclip config, params, TitleTokenizer or None if it has no tokenizer)."""
    hf_dir = pathlib.Path(hf_dir)
    hf = read_hf_config(hf_dir)
    config = config_from_hf(hf, base)
    tokenizer = None
    if any((hf_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        hf_tok = tokenizer_lib.load_hf_tokenizer(hf_dir)
        tokenizer = tokenizer_lib.TitleTokenizer(hf_tok, context_length=config.tokenizer.context_length,
                                                 lowercase=False, truncation=config.tokenizer.truncation)
    vocab_size = config.model.text.vocab_size
    pad_id = tokenizer.pad_id if tokenizer is not None else hf["text_config"].get("pad_token_id") or 0
    like = abstract_params(config, vocab_size, pad_id)
    params = params_from_hf(read_hf_tensors(hf_dir), config, like)
    return config, params, tokenizer


def import_hf_clip(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path,
                   base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Writes a prodclip workdir (config.json, tokenizer/, orbax checkpoint at step 0) for a HF CLIP dir."""
    hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir).absolute()
    config, params, tokenizer = load_hf_clip(hf_dir, base)
    if tokenizer is None:
        raise CheckpointError(f"no tokenizer in {hf_dir} (tokenizer.json or vocab.json + merges.txt); "
                              f"the imported model needs the tokenizer it was trained with")
    config.tokenizer.path = str(workdir / "tokenizer")
    config.model.init_checkpoint = str(workdir)
    config_checks.validate(config)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(workdir / "tokenizer")
    checkpoint.write_config(workdir, config)
    state = optim.init_train_state(config, params)
    with checkpoint.Checkpointer(workdir, config) as ckpt:
        ckpt.save(0, state, None)
    return config


# ----------------------------------------------------------------------------- export


def export_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The options of `config` that a transformers CLIPModel cannot express (empty: exportable)."""
    m = config.model
    want = {
        "model.image.pooling": (m.image.pooling, "cls"), "model.image.posemb": (m.image.posemb, "learn"),
        "model.image.pre_norm": (m.image.pre_norm, True), "model.image.patch_bias": (m.image.patch_bias, False),
        "model.image.proj_bias": (m.image.proj_bias, False), "model.image.stem": (m.image.stem, "patch"), "model.text.proj_bias": (m.text.proj_bias, False),
        "model.text.mask": (m.text.mask, "causal"), "model.text.pooling": (m.text.pooling, "eot"),
        "loss.name": (config.loss.name, "softmax"),
    }
    problems = [f"{key}={have!r} (CLIP needs {need!r})" for key, (have, need) in want.items() if have != need]
    for key, have, need in (("model.image.kind", m.image.kind, "vit"), ("model.text.kind", m.text.kind, "transformer"),
                            ("model.matcher.kind", m.matcher.kind, "none")):
        if have != need:
            problems.append(f"{key}={have!r} (CLIP needs {need!r})")
    for tower in ("image", "text"):
        dims = config_lib.tower_dims(m[tower], config_lib.VIT_PRESETS if tower == "image" else config_lib.TEXT_PRESETS)
        if not float(dims["width"] * m[tower].mlp_ratio).is_integer():
            problems.append(f"model.{tower}.mlp_ratio={m[tower].mlp_ratio} gives a fractional MLP width")
    if m.fusion.enabled:
        problems.append("model.fusion.enabled=True (CLIPModel has no fusion encoder or ITM head, and prodclip "
                        "does not drop trained weights silently; `prodclip export` keeps the whole model)")
    return problems


def export_hf_clip(workdir: str | pathlib.Path, out_dir: str | pathlib.Path, step: int | None = None) -> dict:
    """Writes a prodclip run as a HF CLIP directory (config.json, model.safetensors, tokenizer,
    preprocessor_config.json). Returns the CLIPConfig dict written."""
    workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
    config = config_loading.load_config_json(workdir / "config.json")
    problems = export_problems(config)
    if problems:
        raise CheckpointError("this model cannot be written as a transformers CLIPModel: " + "; ".join(problems))
    hf_tok = tokenizer_lib.load_hf_tokenizer(workdir / "tokenizer")
    tokenizer = tokenizer_lib.TitleTokenizer(hf_tok, context_length=config.tokenizer.context_length,
                                             lowercase=config.tokenizer.lowercase)
    like = abstract_params(config, tokenizer.vocab_size, tokenizer.pad_id)
    target = jax.eval_shape(lambda p: optim.init_train_state(config, p), like)
    params, _ = checkpoint.load_params(workdir, config, target, step)
    hf = hf_config_for(config, params, tokenizer)
    return write_hf_clip(out_dir, hf, params, config, tokenizer)


def hf_config_for(config: ml_collections.ConfigDict, params: dict, tokenizer) -> dict:
    """The CLIPConfig dict for a CLIP-compatible prodclip config and its params."""
    m = config.model
    log_scale = float(np.asarray(params["log_logit_scale"]))
    if math.exp(log_scale) > m.logit_scale_max:
        raise CheckpointError(f"log_logit_scale={log_scale:.4f} exceeds model.logit_scale_max={m.logit_scale_max}: "
                              f"prodclip clamps it, CLIPModel would not")
    if m.text.eot_rule == "argmax":
        eos = 2
    elif m.text.eot_rule == "eos_id":
        eos = m.text.eos_id
    else:  # last_nonpad: the tokenizer's end token is the last non-pad token of every title
        eos = tokenizer.hf.eos_token_id if tokenizer.hf.eos_token_id is not None else tokenizer.hf.sep_token_id
        if eos is None or eos == 2:
            raise CheckpointError(
                f"model.text.eot_rule='last_nonpad' needs a tokenizer end token (eos or sep) with id != 2 for "
                f"CLIPModel's pooling; the tokenizer's is {eos!r}")
    image = config_lib.tower_dims(m.image, config_lib.VIT_PRESETS)
    text = config_lib.tower_dims(m.text, config_lib.TEXT_PRESETS)
    act = {"gelu": "gelu", "quick_gelu": "quick_gelu"}
    vocab_size = int(params["text_tower"]["token_embed"]["embedding"].shape[0])
    return transformers.CLIPConfig(
        projection_dim=m.embed_dim, logit_scale_init_value=log_scale,
        text_config=dict(
            vocab_size=vocab_size, hidden_size=text["width"], num_hidden_layers=text["depth"],
            num_attention_heads=text["num_heads"], intermediate_size=int(text["width"] * m.text.mlp_ratio),
            max_position_embeddings=config.tokenizer.context_length, hidden_act=act[m.text.activation],
            layer_norm_eps=1e-5, projection_dim=m.embed_dim, eos_token_id=int(eos), pad_token_id=tokenizer.pad_id,
            bos_token_id=tokenizer.hf.bos_token_id if tokenizer.hf.bos_token_id is not None
            else tokenizer.hf.cls_token_id),
        vision_config=dict(
            hidden_size=image["width"], num_hidden_layers=image["depth"], num_attention_heads=image["num_heads"],
            intermediate_size=int(image["width"] * m.image.mlp_ratio), image_size=config.data.image_size,
            patch_size=m.image.patch_size, num_channels=3, hidden_act=act[m.image.activation],
            layer_norm_eps=1e-5, projection_dim=m.embed_dim),
    ).to_dict()


def hf_tensors(params: dict, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """HF CLIPModel tensors (float32, contiguous) from our params."""
    m = config.model
    out = {}
    for name, path, kind in tensor_table(m.image.depth, m.text.depth):
        out[name] = np.array(_to_hf(np.asarray(get_path(params, path), np.float32), kind, m.image.patch_size), order="C")
    return out


def write_hf_clip(out_dir: pathlib.Path, hf: dict, params: dict, config, tokenizer) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = {**hf, "architectures": ["CLIPModel"]}
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    save_file(hf_tensors(params, config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    mean, std = PIXEL_STATS[config.model.image.pixel_norm]
    size = config.data.image_size
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [v / 255 for v in mean],
        "image_std": [v / 255 for v in std], "do_convert_rgb": True, "resample": 3}, indent=2))
    tokenizer.save(out_dir)
    return hf
