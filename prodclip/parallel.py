"""Devices, meshes and hosts: the mesh, partition rules, placement, the compiled step.

One train step serves one device, one host of many devices and many hosts:

* `make_mesh`: a ``jax.sharding.Mesh`` with axes ``("data", "fsdp")`` from
  ``config.parallel.mesh_shape`` (-1 = the remaining devices), over all global
  devices (every process's, after `initialize_distributed`).
* `PARTITION_RULES` + `partition_spec`: the one table that says how every
  parameter is laid out. FSDP shards a parameter's largest dimension divisible
  by the ``fsdp`` axis size; small parameters (and the logit scale / bias) are
  replicated. The rules look at path suffixes and shapes only, so the optimizer
  state (whose moments mirror the parameter tree) follows its parameter.
* The batch is sharded over ``("data", "fsdp")``; each process feeds its own
  rows (`jax.make_array_from_process_local_data`).
* `compile_train_step`: ``jax.jit`` with explicit in/out shardings
  (``parallel.strategy="sharded"``), or a data-parallel ``jax.pmap`` whose
  gradients are ``pmean``'d and whose loss still sees the global batch by
  all-gathering the embeddings (``parallel.strategy="pmap"``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from functools import partial
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prodclip import losses

log = logging.getLogger("prodclip")

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both mesh axes
PMAP_AXIS = "devices"

# A pair loss: (image_emb [B, D], text_emb [B, D], logit_scale, logit_bias, batch) -> scalar.
PairLoss = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, dict], jax.Array]


# ----------------------------------------------------------------------------- hosts


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                           timeout_s: int = 300) -> None:
    """Joins JAX's multi-controller runtime; call before any other JAX call.

    With ``coordinator_address`` (``host:port`` of process 0), ``num_processes``
    and ``process_id`` given, uses them. With none given, JAX detects the cluster
    itself (Cloud TPU pod slices, SLURM via ``srun``, Open MPI).
    """
    explicit = (coordinator_address, num_processes > 0, process_id >= 0)
    if any(explicit) and not all(explicit):
        raise ValueError("multi-host: give all of coordinator address, number of processes and process id "
                         f"(got address={coordinator_address!r}, num_processes={num_processes}, "
                         f"process_id={process_id}), or none of them for auto-detection")
    kwargs = dict(initialization_timeout=timeout_s)
    if coordinator_address:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def distributed_flags_from_env(environ=os.environ) -> dict:
    """Multi-host settings from PRODCLIP_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID (unset: auto)."""
    return dict(coordinator_address=environ.get("PRODCLIP_COORDINATOR_ADDRESS", ""),
                num_processes=int(environ.get("PRODCLIP_NUM_PROCESSES", 0)),
                process_id=int(environ.get("PRODCLIP_PROCESS_ID", -1)))


# ----------------------------------------------------------------------------- mesh


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a -1 by the remaining devices; the product must equal num_devices."""
    shape = list(mesh_shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"parallel.mesh_shape={tuple(mesh_shape)}: {num_devices} devices are not "
                             f"divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"parallel.mesh_shape={tuple(mesh_shape)} needs {math.prod(shape)} devices, "
                         f"but {num_devices} are available; use -1 for 'the rest'")
    return tuple(shape)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp) mesh over `devices` (default: all global devices), with Auto axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config.parallel.mesh_shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over all devices of the mesh."""
    devices, accum = mesh.devices.size, config.train.grad_accum_steps
    if config.train.batch_size % (devices * accum):
        raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by "
                         f"{devices} devices x train.grad_accum_steps={accum} = {devices * accum}")


# ----------------------------------------------------------------------------- partition rules

# (regex searched in the '/'-joined path, rule). First match wins. Paths of the
# optimizer state end with the parameter's path, so the same rule applies to its
# moments. "fsdp": shard the largest dimension divisible by the fsdp axis size.
PARTITION_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(log_logit_scale|logit_bias)$", "replicate"),
    (r"(^|/)(count|step)$", "replicate"),
    (r".*", "fsdp"),
)


def path_name(path) -> str:
    """A key path as 'image_tower/encoder/blocks/0/attn/query/kernel'."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def partition_spec(name: str, shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """The PartitionSpec of one array (parameter or optimizer moment) from `PARTITION_RULES`."""
    rule = next(rule for pattern, rule in PARTITION_RULES if re.search(pattern, name))
    if rule == "replicate" or fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return P()


def tree_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
    """NamedShardings for every array leaf of a train state (params, optimizer state, step)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(path_name(path), np.shape(x), fsdp, min_size)), tree)


def place(tree: Any, shardings: Any) -> Any:
    """Host (or single-device) arrays -> global arrays with `shardings`; every process passes the same values."""
    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree, shardings)


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays sharded over ("data", "fsdp")."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- losses


def ring_pair_loss(config: ml_collections.ConfigDict, mesh: Mesh) -> PairLoss:
    """The ring loss (losses.make_ring_loss) over the batch axes, as a PairLoss (diagonal positives only)."""
    ring = losses.make_ring_loss(mesh, config.loss.name, data_axes=BATCH_AXES)
    return lambda image_emb, text_emb, logit_scale, logit_bias, batch: ring(
        image_emb, text_emb, logit_scale, logit_bias)


def gathered_pair_loss(pair_loss: PairLoss, axis_name: str) -> PairLoss:
    """For per-device code (pmap): all-gathers embeddings and ids, then applies the global-batch loss.

    The gather's transpose sums every device's cotangent into the owner's rows,
    so each device's gradient is n times its share; the pmean over devices then
    gives exactly the global-batch gradient.
    """
    def loss(image_emb, text_emb, logit_scale, logit_bias, batch):
        gather = partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
        global_batch = {k: gather(batch[k]) for k in ("ids", "token_ids")}
        return pair_loss(gather(image_emb), gather(text_emb), logit_scale, logit_bias, global_batch)
    return loss


# ----------------------------------------------------------------------------- compiled step


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """A compiled train step and the functions that move state and batches to and from it.

    step:         (device state, device batch) -> (device state, metrics)
    place_state:  host/global state -> device state (sharded, or replicated per device for pmap)
    place_batch:  this process's numpy batch -> device batch
    global_state: device state -> state of global arrays (for eval and checkpoints)
    """
    step: Callable
    place_state: Callable
    place_batch: Callable
    global_state: Callable


StepBuilder = Callable[[PairLoss, Callable | None], Callable]


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh, build_step: StepBuilder,
                       pair_loss: PairLoss, state: Any) -> CompiledStep:
    """Compiles the train step for `config.parallel.strategy` and `config.parallel.loss`.

    Args:
      mesh: the (data, fsdp) mesh (the pmap strategy uses this process's devices instead).
      build_step: ``(pair_loss, reduce_grads) -> step(state, batch) -> (state, metrics)``;
        ``reduce_grads`` is None or a function applied to the gradient pytree.
      pair_loss: the plain global-batch loss on ``[B, D]`` embeddings (the
        all-gather variant when the embeddings are sharded over the mesh).
      state: the initial state (only its structure and shapes are used).
    """
    if config.parallel.strategy == "pmap":
        step = build_step(gathered_pair_loss(pair_loss, PMAP_AXIS), partial(jax.lax.pmean, axis_name=PMAP_AXIS))
        return pmap_step(step, jax.local_devices())
    if config.parallel.loss == "ring":
        pair_loss = ring_pair_loss(config, mesh)
    shardings = tree_shardings(state, mesh, config.parallel.fsdp_min_size)
    return sharded_step(build_step(pair_loss, None), mesh, shardings)


def sharded_step(step: Callable, mesh: Mesh, state_shardings: Any) -> CompiledStep:
    """``jax.jit`` with explicit shardings: state as `state_shardings`, batch over the batch axes."""
    replicated = NamedSharding(mesh, P())
    compiled = jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    return CompiledStep(step=compiled, place_state=partial(place, shardings=state_shardings),
                        place_batch=partial(place_batch, mesh=mesh), global_state=lambda s: s)


def pmap_step(step: Callable, devices: Sequence[jax.Device]) -> CompiledStep:
    """``jax.pmap`` over this process's devices: state replicated, batch split on a leading device axis."""
    n = len(devices)
    compiled = jax.pmap(step, axis_name=PMAP_AXIS, devices=devices, donate_argnums=(0,))

    # The same layout pmap gives its outputs, so the second call reuses the first compilation.
    stacked = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

    def replicate(state):
        return jax.tree.map(lambda x: jax.device_put(np.stack([np.asarray(x)] * n), stacked), state)

    def split(batch):
        return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}

    return CompiledStep(step=compiled, place_state=replicate, place_batch=split,
                        global_state=lambda s: jax.tree.map(lambda x: x[0], s))
