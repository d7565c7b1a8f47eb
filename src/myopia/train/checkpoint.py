"""Checkpoints: safetensors and JSON only (loading never unpickles), written atomically.

A checkpoint is a folder ``step_NNNNNNN`` holding ``model.safetensors``, ``optimizer.safetensors``
(every tensor of the optimiser state), ``state.json`` (step, optimiser hyper-parameters, anything
else the loop needs) and ``manifest.json`` (sha256 of each file, checked on load). It is written to a
temporary folder and renamed into place; the ``latest`` file naming the newest one is replaced
atomically after that. A process killed at any moment leaves the previous checkpoint loadable.

Under FSDP (``train.parallel fsdp`` with several processes) a checkpoint is *sharded*: every rank writes
its own shards of the weights and optimiser state with ``torch.distributed.checkpoint`` into
``shards/`` (safetensors files, no pickles), and no rank ever holds the full state. Such a checkpoint
resumes at any number of processes (:func:`load_sharded` under FSDP; :func:`read_checkpoint` assembles
the full state in one process, so export and analysis read both formats); :func:`consolidate` rewrites
it in the single-file format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
LATEST = "latest"
SHARDS = "shards"
RNG_FILE = "rng.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and why."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into named tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars,
                     "int_keys": all(isinstance(k, int) for k in osd["state"])}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    def key(pid: str):
        return int(pid) if meta.get("int_keys") else pid

    state: dict = {}
    for name, value in tensors.items():
        pid, k = name.rsplit("/", 1)
        state.setdefault(key(pid), {})[k] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(key(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _dedupe(model_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names that alias another tensor (tied weights); return them as {alias: kept name}."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model_state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            aliases[name] = seen[ident]
        else:
            seen[ident] = name
            kept[name] = t.detach().cpu().contiguous()
    return kept, aliases


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda{i}"] = s
    return out


def gather_rng(dist) -> dict[str, torch.Tensor]:
    """Every rank's generator states, for rank 0 to save (a collective under torchrun): rank r's as
    ``rng/rank<r>/...`` beside rank 0's as plain ``rng/...`` (what a one-process run restores)."""
    mine = rng_tensors()
    if not dist.enabled:
        return mine
    every = dist.all_objects({k: v.cpu() for k, v in mine.items()})
    out = {k: v.clone() for k, v in every[0].items()}
    for rank, states in enumerate(every):
        out.update({f"rng/rank{rank}/{k[len('rng/'):]}": v.clone() for k, v in states.items()})
    return out


def rng_for_rank(tensors: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """The generator states rank ``rank`` restores: its own, when the checkpoint was saved by as many
    processes; otherwise rank 0's (a run resumed at another world size cannot continue every rank's
    stream; batches do not depend on it, dropout masks do)."""
    prefix = f"rng/rank{rank}/"
    own = {f"rng/{k[len(prefix):]}": v for k, v in tensors.items() if k.startswith(prefix)}
    saved_world = len({k.split("/")[1] for k in tensors if k.startswith("rng/rank")})
    if own and saved_world == world:
        return own
    return {k: v for k, v in tensors.items() if k.startswith("rng/") and not k.startswith("rng/rank")}


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng/cpu" in tensors:
        torch.set_rng_state(tensors["rng/cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(
    ckpt_dir: str,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict | None,
    state: dict,
    keep: int = 2,
    rng: dict[str, torch.Tensor] | None = None,
    point_latest: bool = True,
) -> str:
    """Write checkpoint ``step`` under ``ckpt_dir`` atomically and return its folder.

    ``model_state``/``optim_state`` are full (unsharded) state dicts, e.g. from :func:`capture`;
    ``rng`` the generator states to store (default: this process's; a multi-process run passes every
    rank's, :func:`gather_rng`). ``point_latest``: make it the checkpoint ``latest`` names (a
    consolidation of an older step does not). Stale temporary folders of earlier, killed saves are
    removed first.
    """
    os.makedirs(ckpt_dir, exist_ok=True)
    remove_stale(ckpt_dir)
    name = f"step_{step:07d}"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        weights, aliases = _dedupe(model_state)
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        opt_meta = None
        extra = dict(rng if rng is not None else rng_tensors())
        if optim_state is not None:
            opt_tensors, opt_meta = flatten_optimizer_state(optim_state)
            extra.update({f"optim/{k}": v for k, v in opt_tensors.items()})
        save_file(extra, os.path.join(tmp, "optimizer.safetensors"))
        _write_json(os.path.join(tmp, "state.json"),
                    {**state, "step": step, "optimizer": opt_meta, "tied": aliases})
        for fname in ("model.safetensors", "optimizer.safetensors"):
            with open(os.path.join(tmp, fname), "rb") as f:
                os.fsync(f.fileno())
        _commit(tmp, final, point_latest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(ckpt_dir)
        raise CheckpointError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); the last good checkpoint "
            f"{previous or '(none)'} is kept. Free disk space and continue with --resume") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(ckpt_dir, keep)
    return final


def _commit(tmp: str, final: str, point_latest: bool = True) -> None:
    """Checksum every file of the finished folder ``tmp``, move it to ``final`` and (``point_latest``)
    point ``latest`` at it. Re-saving an existing step moves the old folder aside first
    (``.step_N.old-PID``) and deletes it only after the new one is in place; a kill between the two
    renames leaves both the old folder and the complete new one (``.step_N.tmp-PID``, manifest
    written), which :func:`latest_checkpoint` finds: there is a loadable checkpoint at every instant."""
    ckpt_dir, name = os.path.dirname(final), os.path.basename(final)
    files = sorted(os.path.relpath(os.path.join(root, f), tmp) for root, _, names in os.walk(tmp) for f in names)
    _write_json(os.path.join(tmp, MANIFEST), {f: _sha256(os.path.join(tmp, f)) for f in files})
    _fsync_dir(tmp)
    trash = None
    if os.path.exists(final):  # never delete a complete checkpoint in place: move it aside first
        trash = os.path.join(ckpt_dir, f".{name}.old-{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    if point_latest:
        atomic_write_text(os.path.join(ckpt_dir, LATEST), name + "\n")


def _set_aside(ckpt_dir: str) -> list[str]:
    """Folders of interrupted saves under ``ckpt_dir``: ``.step_N.tmp-*`` (being written, or complete
    and about to be renamed) and ``.step_N.old-*`` (a complete checkpoint moved aside while its step
    was re-saved)."""
    return sorted(n for n in os.listdir(ckpt_dir)
                  if n.startswith(".step_") and (".tmp-" in n or ".old-" in n))


def remove_stale(ckpt_dir: str) -> list[str]:
    """Delete the set-aside folders of earlier, killed saves (:func:`_set_aside`) once ``ckpt_dir``
    holds an intact checkpoint that does not need them; returns what was removed. Each is a full-size
    copy of a checkpoint, so a run killed during saves would otherwise fill the disk."""
    if not os.path.isdir(ckpt_dir):
        return []
    stale = _set_aside(ckpt_dir)
    if not stale or not any(_intact(os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir) if n.startswith("step_")):
        return []
    for name in stale:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    return stale


def _intact(path: str) -> bool:
    try:
        verify(path)
        return True
    except CheckpointError:
        return False


def is_sharded(path: str) -> bool:
    """Whether the checkpoint folder ``path`` holds per-rank shards (an FSDP run's) instead of single files."""
    return os.path.isdir(os.path.join(path, SHARDS))


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """This rank's view of the state: ``(flat, model_sd, optim_sd, scalars)``, where ``flat`` names
    every tensor (``model.<fqn>``, ``optim.<fqn>.<key>``; DTensor shards under FSDP) and shares storage
    with the two state dicts, so loading into ``flat`` in place loads them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    tied = _tied_names(model)
    flat = {f"model.{k}": v for k, v in model_sd.items() if k not in tied}
    scalars: dict[str, dict] = {}
    for fqn, values in optim_sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                flat[f"optim.{fqn}.{key}"] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    return flat, model_sd, optim_sd, scalars


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for parameters registered under several names (tied embeddings): the
    same on every rank, since it is read from the module tree, not from the shards' storage."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


SHARD_FILE_BYTES = 256 * 2**20
"""Tensors (at their full size) per group of shard files: each rank serialises one file of at most its
share of this at a time, so saving adds about that much memory, however large the model."""


def _file_buckets(flat: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{name: file index}`` (1, 2, ...): consecutive tensors grouped up to :data:`SHARD_FILE_BYTES`
    of full (global) size; the same on every rank, since it reads global shapes only."""
    index, used, out = 1, 0, {}
    for name, t in flat.items():
        size = t.numel() * t.element_size()  # a DTensor's numel is its global one
        if used and used + size > SHARD_FILE_BYTES:
            index, used = index + 1, 0
        out[name] = index
        used += size
    return out


def save_sharded_checkpoint(ckpt_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict, dist, keep: int = 2) -> str:
    """Write checkpoint ``step`` with every rank saving only its own shards (a collective: call it on
    every rank; ``dist`` is the run's :class:`~myopia.train.distributed.Dist`). Atomic like
    :func:`save_checkpoint`: the shards go to a temporary folder that rank 0 renames when all are written."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save

    name = f"step_{step:07d}"
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, f".{name}.tmp-sharded")
    if dist.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        remove_stale(ckpt_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    flat, _, optim_sd, scalars = _sharded_state(model, optimizer)
    try:
        writer = HuggingFaceStorageWriter(os.path.join(tmp, SHARDS), save_distributed=True,
                                          fqn_to_index_mapping=_file_buckets(flat))
        dcp_save(flat, storage_writer=writer)
        rng = gather_rng(dist)  # every rank's generators, gathered to rank 0
        if dist.is_main:
            save_file(rng, os.path.join(tmp, RNG_FILE))
            _write_json(os.path.join(tmp, "state.json"), {
                **state, "step": step, "sharded": True, "tied": _tied_names(model),
                "optimizer": {"param_groups": optim_sd["param_groups"], "scalars": scalars, "int_keys": False}})
            _commit(tmp, final)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if dist.is_main:
        _prune(ckpt_dir, keep)
    return final


def _read_sharded(path: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """A sharded checkpoint's full state, assembled in this process: ``(flat tensors, state, rng)``."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load

    shards = os.path.join(path, SHARDS)
    metadata = HuggingFaceStorageReader(shards).read_metadata()
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp_load(flat, storage_reader=HuggingFaceStorageReader(shards), no_dist=True)
    return (flat, *_sharded_state_and_rng(path))


def _sharded_state_and_rng(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A sharded checkpoint's ``state.json`` and the RNG state rank 0 saved beside the shards."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    return state, load_file(os.path.join(path, RNG_FILE))


def load_sharded(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 verified: bool = False) -> tuple[dict, dict]:
    """Load a sharded checkpoint into a (FSDP-wrapped or plain) model and its optimiser, each rank
    reading only the shards it holds (a collective under torchrun). Returns ``(state, rng)``."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not verified:  # every file's checksum: the whole checkpoint, so a caller that checked it once skips it
        verify(path)
    flat, model_sd, optim_sd, _ = _sharded_state(model, optimizer)
    dcp_load(flat, storage_reader=HuggingFaceStorageReader(os.path.join(path, SHARDS)))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return _sharded_state_and_rng(path)


def consolidate(path: str) -> str:
    """Rewrite the sharded checkpoint folder ``path`` in place in the single-file format (one process,
    no process group; needs memory for the full state). Returns ``path``."""
    if not is_sharded(path):
        return path
    weights, optim_state, state, rng = read_checkpoint(path)
    state = {k: v for k, v in state.items() if k not in ("sharded", "optimizer", "tied", "step")}
    ckpt_dir = os.path.dirname(path.rstrip("/"))
    is_latest = latest_checkpoint(ckpt_dir, verified=False) in (path.rstrip("/"), None)
    return save_checkpoint(ckpt_dir, checkpoint_step(path), weights, optim_state, state,
                           keep=10**9, rng=rng, point_latest=is_latest)


def _prune(ckpt_dir: str, keep: int) -> None:
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_"))
    for old in names[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def latest_checkpoint(ckpt_dir: str, verified: bool = True, log=None) -> str | None:
    """The newest complete checkpoint folder under ``ckpt_dir``, or None.

    With ``verified`` the checksums are checked, and a damaged checkpoint is skipped (with a
    message) in favour of the newest older one that is intact. A step whose folder is missing or
    damaged is also looked for among the folders an interrupted re-save set aside (:func:`_set_aside`).
    """
    if not os.path.isdir(ckpt_dir):
        return None
    candidates = []
    pointer = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            candidates.append(f.read().strip())
    steps = sorted((n for n in os.listdir(ckpt_dir) if n.startswith("step_")), reverse=True)
    aside = _set_aside(ckpt_dir)
    by_step: dict[str, list[str]] = {}
    for n in aside:  # ".step_N.tmp-PID" before ".step_N.old-PID": a complete tmp is the newer save
        by_step.setdefault(n[1:].split(".")[0], []).append(n)
    for key in by_step:
        by_step[key].sort(key=lambda n: ".old-" in n)
    names = sorted(set(steps) | set(by_step), reverse=True)
    for name in names:
        candidates += [name, *by_step.get(name, [])]
    seen = set()
    for name in candidates:
        path = os.path.join(ckpt_dir, name)
        if name in seen or not os.path.isfile(os.path.join(path, MANIFEST)):
            continue
        seen.add(name)
        if not verified:
            return path
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            (log or print)(f"skipping damaged checkpoint: {exc}")
    return None


def damage_report(ckpt_dir: str) -> str | None:
    """What ``ckpt_dir`` holds when it holds no intact checkpoint but is not empty (damaged or
    incomplete checkpoints, folders of interrupted saves), in a few words; None if it holds an intact
    checkpoint or nothing at all (a run that never saved)."""
    if not os.path.isdir(ckpt_dir) or latest_checkpoint(ckpt_dir, log=lambda *_: None) is not None:
        return None
    found = []
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isdir(path):
            continue
        try:
            verify(path)
        except CheckpointError as exc:
            found.append(str(exc).split(" (")[0] if "checksum" not in str(exc) else str(exc))
    if not found and not os.path.isfile(os.path.join(ckpt_dir, LATEST)):
        return None
    return "; ".join(found) or f"{ckpt_dir} names a latest checkpoint that is gone"


def set_aside_damaged(arm_dir: str) -> str:
    """Move an arm's checkpoints folder (all damaged) and its metrics.jsonl aside, under names with the
    time, so that the arm can train again from step 0 without deleting anything; returns the new
    folder's path."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    src = os.path.join(arm_dir, "checkpoints")
    dst = os.path.join(arm_dir, f"checkpoints.damaged-{stamp}")
    os.replace(src, dst)
    metrics = os.path.join(arm_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.replace(metrics, os.path.join(dst, "metrics.jsonl"))
    return dst


def checkpoint_step(path: str | None) -> int:
    """The step a checkpoint folder (``.../step_NNNNNNN``) holds; 0 for None (no checkpoint yet)."""
    if not path:
        return 0
    name = os.path.basename(path.rstrip("/")).lstrip(".")  # also a set-aside ".step_N.old-PID"
    return int(name.split(".")[0].split("_")[-1])


def verify(path: str) -> None:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST}); delete it or resume from an older one")
    with open(manifest_path) as f:
        manifest = json.load(f)
    for fname, digest in manifest.items():
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath) or _sha256(fpath) != digest:
            raise CheckpointError(f"checkpoint file {fpath} is missing or corrupt (checksum mismatch)")


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict | None, dict, dict[str, torch.Tensor]]:
    """Verify and read a checkpoint: ``(model_state, optim_state, state, rng)`` (no pickles involved)."""
    verify(path)
    try:
        if is_sharded(path):
            flat, state, rng = _read_sharded(path)
            weights = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
            extra = {**rng, **{f"optim/{k[len('optim.'):].rsplit('.', 1)[0]}/{k.rsplit('.', 1)[1]}": v
                               for k, v in flat.items() if k.startswith("optim.")}}
        else:
            with open(os.path.join(path, "state.json")) as f:
                state = json.load(f)
            weights = load_file(os.path.join(path, "model.safetensors"))
            extra = load_file(os.path.join(path, "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} could not be read: {exc}") from None
    for alias, name in state.get("tied", {}).items():
        weights[alias] = weights[name]
    optim_state = None
    if state.get("optimizer") is not None:
        opt_tensors = {k[len("optim/"):]: v for k, v in extra.items() if k.startswith("optim/")}
        optim_state = unflatten_optimizer_state(opt_tensors, state["optimizer"])
    rng = {k: v for k, v in extra.items() if k.startswith("rng/")}
    return weights, optim_state, state, rng


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """Full model and optimiser state dicts (parameter names as keys), gathered to the CPU.

    Works for a plain module, DDP and FSDP2 alike (a collective under FSDP2: call it on every rank),
    so a checkpoint saved with any number of processes loads with any other.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
            optim_state: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    if optimizer is None or optim_state is None:
        set_model_state_dict(model, model_state, options=opts)
    else:
        _adopt_optimizer_state(model, optimizer, optim_state)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=opts)


def _adopt_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict) -> None:
    """Hand a stateless optimiser the loaded per-parameter state itself. torch's ``set_state_dict``
    would first make the optimiser a state of its own (a zero-gradient step: one more tensor per
    moment, SmolLM2-135M's AdamW 1.1 GB) and copy the loaded one into it; with a state already there
    it loads the same tensors in place of these. Only for an unwrapped model whose parameters carry
    the checkpoint's names and shapes (DDP's inner module too); anything else (FSDP shards) is left
    to ``set_state_dict``."""
    from torch.distributed.tensor import DTensor

    if optimizer.state or not optim_state.get("state"):
        return
    params = dict(getattr(model, "module", model).named_parameters())
    state = optim_state["state"]
    if set(state) - set(params):
        return
    adopted = {}
    for name, values in state.items():
        param = params[name]
        tensors = [v for v in values.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if isinstance(param, DTensor) or any(
                v.shape != param.shape or v.dtype != param.dtype or v.device != param.device for v in tensors):
            return
        adopted[param] = dict(values)
    optimizer.state.update(adopted)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng_state: bool = True) -> dict:
    """Load weights (and optimiser/RNG state) from a checkpoint folder; return its ``state.json``."""
    weights, optim_state, state, rng = read_checkpoint(path)
    restore(model, optimizer, weights, optim_state)
    if restore_rng_state:
        restore_rng(rng)
    return state
