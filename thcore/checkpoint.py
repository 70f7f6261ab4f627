"""Atomic checkpoints: tensors in safetensors, metadata in JSON, nothing pickled.

    <run>/checkpoints/step_<N>/model.safetensors      params under their pytree names
                               optimizer.safetensors  optimizer state, flattened ('exp_avg/<name>')
                               ema.safetensors        EMA of the params, when the state keeps one
                               state.json             step, seed, data cursor, loss scale + the parts' state
                               manifest.json          size and sha256 of each file, written last
    <run>/checkpoints/latest                          'step_<N>': the newest complete checkpoint

The best checkpoint (lowest eval loss) is the one whose step every later state.json records as `best_step`;
pruning keeps it.

A checkpoint is written into a temporary directory, fsynced, renamed into place, and only then named by
`latest` (itself replaced atomically): a crash at any point leaves the previous checkpoint intact and named.
Re-saving a step swaps the new directory in with one atomic exchange; pruning renames a directory away before
deleting it, so no half-deleted `step_<N>` is ever visible. Leftovers of a killed save are swept by the next one.
Loading checks the manifest and falls back to the previous complete checkpoint when a file is damaged.
"""
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import threading

import torch
from safetensors.torch import load_file, save_file

from . import tree
from .config import ConfigError

MANIFEST = "manifest.json"


class CheckpointError(ConfigError):
    """A missing, truncated or corrupt checkpoint file; the message names the file."""


class IncompatibleCheckpoint(CheckpointError):
    """A complete checkpoint that does not fit the model being built (another shape or set of params): no older
    checkpoint of the same run would fit either, so resuming stops here instead of skipping it."""


def plain_mode(path: str) -> None:
    """Give a written file the mode a plain open() gives (0666 less the umask): some writers create 0600 files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two directories atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failure(final: str, e: BaseException) -> str:
    """One line for a failed write; a full disk says what to do (safetensors reports its I/O errors as text)."""
    code = getattr(e, "errno", None)
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
    full = code in _DISK_FULL or any(f"os error {c})" in str(e) for c in _DISK_FULL)
    hint = ("; the disk is full: free space or lower keep_checkpoints (older checkpoints are pruned only after a "
            "new one is complete)") if full else ""
    return f"could not write checkpoint {final}: {text}{hint}; the previous checkpoint is intact"


def write_dir(final: str, writers: dict, known: dict | None = None) -> None:
    """Create directory `final` atomically: each `writers[name](path)` writes one file into a temporary
    directory, a manifest with sizes and checksums is added, everything is fsynced, then it is renamed.

    `known`: {name: {"size", "sha256"}} of files whose writers hashed and fsynced them already (each rank of a
    sharded checkpoint its own, in parallel)."""
    known = known or {}
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, write in writers.items():
            write(os.path.join(tmp, name))
        files = {}
        for dirpath, _, names in os.walk(tmp):
            for n in names:
                p = os.path.join(dirpath, n)
                rel = os.path.relpath(p, tmp)
                if rel in known:
                    files[rel] = known[rel]
                    continue
                plain_mode(p)
                files[rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
                _fsync(p)
        _write_json(os.path.join(tmp, MANIFEST), {"files": files})
        _fsync(os.path.join(tmp, MANIFEST))
        _fsync(tmp)
        if not os.path.exists(final):
            os.rename(tmp, final)
        elif _exchange(tmp, final):   # re-saving the same step: one atomic swap, then the old one (now tmp) goes
            shutil.rmtree(tmp)
        else:   # no renameat2: a crash between these two renames leaves `final` missing (loading falls back)
            old = f"{tmp}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        _fsync(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            raise CheckpointError(_write_failure(final, e)) from e
        raise


def file_entry(path: str) -> dict:
    """The manifest entry of a written file (made readable as other files are, and fsynced)."""
    plain_mode(path)
    _fsync(path)
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def verify(ckpt: str, only=None) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file of checkpoint `ckpt` (of the
    files named in `only`, when given: a rank of a sharded checkpoint checks the files it reads)."""
    mpath = os.path.join(ckpt, MANIFEST)
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{mpath}: missing or unreadable manifest ({e.__class__.__name__})") from None
    for rel, want in files.items():
        if only is not None and rel not in only:
            continue
        p = os.path.join(ckpt, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: missing")
        if os.path.getsize(p) != want["size"]:
            raise CheckpointError(f"{p}: truncated or extended ({os.path.getsize(p)} bytes, expected {want['size']})")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p}: checksum mismatch (corrupt)")


def root_of(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _step_of(name: str) -> int:
    return int(name.split("_", 1)[1]) if name.startswith("step_") and name[5:].isdigit() else -1


def candidates(root: str) -> list[str]:
    """Checkpoint dirs newest first: the one `latest` names, then the others by step."""
    if not os.path.isdir(root):
        return []
    steps = sorted((n for n in os.listdir(root) if _step_of(n) >= 0), key=_step_of, reverse=True)
    try:
        with open(os.path.join(root, "latest"), errors="replace") as f:   # garbage bytes name nothing
            named = f.read().strip()
        if named in steps:
            steps.remove(named)
            steps.insert(0, named)
    except OSError:
        pass
    return [os.path.join(root, n) for n in steps]


_TEMP = (".tmp-", ".latest-", ".prune-")   # what write_dir, save and pruning leave behind when killed


def _sweep(root: str) -> None:
    """Remove what a killed save left (one writer per run directory: anything temporary now is stale)."""
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(_TEMP):
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _check_space(root: str, final: str, need: int) -> None:
    """Fail before writing anything when the checkpoint cannot fit (the write itself would fail half-way)."""
    os.makedirs(root, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need + (1 << 20) > free:   # 1 MiB for the JSON files and the filesystem's own blocks
        raise CheckpointError(f"not enough disk space for checkpoint {final}: it needs about {need / 2**20:.1f} MiB, "
                              f"{free / 2**20:.1f} MiB are free; free space or lower keep_checkpoints (older "
                              "checkpoints are pruned only after a new one is complete); the previous checkpoint "
                              "is intact")


def step_dir(run_dir: str, step: int) -> str:
    """Where the checkpoint of `step` is (or will be): every rank can name it."""
    return os.path.join(root_of(run_dir), f"step_{step}")


def _host_tensors(state, host) -> dict:
    """{file name: {tensor name: host tensor}}: what a checkpoint holds of `state`, each tensor through `host`."""
    out = {"model.safetensors": state.params, "optimizer.safetensors": tree.flatten(state.opt_state)}
    if state.ema is not None:
        out["ema.safetensors"] = state.ema
    return {f: {k: host(f, k, v.detach()) for k, v in d.items()} for f, d in out.items()}


def _prepare(state, run_dir: str, extra, tensors: dict | None, files: dict | None) -> tuple[str, dict, dict]:
    """(the checkpoint dir, its writers, state.json's contents), once the space for `tensors` is checked."""
    root, final = root_of(run_dir), step_dir(run_dir, state.step)
    _sweep(root)
    meta = {**state.meta(), **(extra or {})}
    writers = {"state.json": lambda p: _write_json(p, meta)}
    for name, d in (tensors or {}).items():
        writers[name] = lambda p, d=d: save_file(d, p, metadata={"format": "pt"})
    if tensors:
        _check_space(root, final, sum(t.nbytes for d in tensors.values() for t in d.values()))
    return final, {**writers, **(files or {})}, meta


def _commit(final: str, writers: dict, meta: dict, keep: int, known: dict | None) -> str:
    """Write the checkpoint dir, point `latest` at it, then prune to the newest `keep`."""
    root = os.path.dirname(final)
    write_dir(final, writers, known)
    tmp = os.path.join(root, f".latest-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(os.path.basename(final) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))
    # the best checkpoint (its step is recorded in every state.json as `best_step`) outlives the pruning
    protect = f"step_{meta['best_step']}" if meta.get("best_step") is not None else None
    for old in candidates(root)[keep:]:
        if os.path.basename(old) != protect:   # renamed away first: a kill mid-delete leaves no partial step_<N>
            gone = os.path.join(root, f".prune-{os.path.basename(old)}-{os.getpid()}")
            try:
                os.rename(old, gone)
            except OSError:   # already gone
                continue
            shutil.rmtree(gone, ignore_errors=True)
    return final


def save(state, run_dir: str, keep: int = 3, extra: dict | None = None, write_tensors: bool = True,
         files: dict | None = None, known: dict | None = None) -> str:
    """Write checkpoints/step_<state.step>, point `latest` at it, then prune to the newest `keep`.

    `files`: more {name: write(path)} entries for write_dir (the DeepSpeed and FSDP engines move their own files
    in); `known`: their manifest entries, when their writers made them."""
    tensors = _host_tensors(state, lambda f, k, t: t.contiguous().cpu()) if write_tensors else None
    return _commit(*_prepare(state, run_dir, extra, tensors, files), keep, known)


class Saver:
    """An engine's `save`: synchronous, or (`background=True`, async_checkpoint) written by a thread of its own.
    In the background the caller waits only for a host copy of the state (into buffers kept from one save to the
    next, pinned for a GPU's tensors), then trains on while the files are written, hashed and fsynced. One save
    at a time: the next one (and `wait`) waits for the last, and raises its error, if it had one."""

    def __init__(self, background: bool = False):
        self.background = background
        self._buffers, self._thread, self._error = {}, None, None

    def _host(self, f, k, t):
        buf = self._buffers.get((f, k))
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._buffers[(f, k)] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        return buf.copy_(t, non_blocking=t.is_cuda)   # queued behind the step that made t: reads its values

    def save(self, state, run_dir: str, keep: int = 3, extra: dict | None = None) -> str:
        self.wait()
        if not self.background:
            return save(state, run_dir, keep=keep, extra=extra)
        tensors = _host_tensors(state, self._host)
        copied = None
        if any(t.is_cuda for t in state.params.values()):
            copied = torch.cuda.Event()
            copied.record()
        final, writers, meta = _prepare(state, run_dir, extra, tensors, None)
        self._thread = threading.Thread(target=self._write, args=(copied, final, writers, meta, keep),
                                        name=f"checkpoint step_{state.step}")
        self._thread.start()
        return final

    def _write(self, copied, *args):
        try:
            if copied is not None:
                copied.synchronize()
            _commit(*args, known=None)
        except BaseException as e:   # raised in the training thread, at its next save or wait
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        e, self._error = self._error, None
        if e is not None:
            raise e


def best(run_dir: str) -> str | None:
    """The checkpoint dir of the best eval so far, as the newest checkpoint's state.json names it (None: no
    eval has been recorded, or that checkpoint is gone)."""
    for ckpt in candidates(root_of(run_dir)):
        try:
            with open(os.path.join(ckpt, "state.json")) as f:
                step = json.load(f).get("best_step")
        except (OSError, ValueError):
            continue   # damaged: ask the one before
        path = step_dir(run_dir, step) if step is not None else None
        return path if path is not None and os.path.isdir(path) else None
    return None


def _load_tensors(path: str, like: dict, what: str) -> dict:
    try:   # safetensors parses a header and copies bytes: a pickle under this name is refused, never run
        loaded = load_file(path)
    except Exception as e:   # SafetensorError (bad header, truncated data), OSError
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).strip().splitlines()[0]})") from None
    if like is None:   # as saved
        return loaded
    check_fits(path, what, {k: v.shape for k, v in loaded.items()}, like)
    return {k: loaded[k].to(device=ref.device, dtype=ref.dtype) for k, ref in like.items()}


def check_fits(where: str, what: str, shapes: dict, like: dict) -> None:
    """IncompatibleCheckpoint naming the first tensor of `like` that the saved {name: shape} lacks, has too
    many of, or holds in another shape."""
    missing, unexpected = set(like) - set(shapes), set(shapes) - set(like)
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise IncompatibleCheckpoint(f"{where}: {what} {name!r} is {'missing' if missing else 'not in this model'}")
    for k, ref in like.items():
        if tuple(shapes[k]) != tuple(ref.shape):
            raise IncompatibleCheckpoint(f"{where}: {what} {k!r} has shape {tuple(shapes[k])}, the model expects "
                                         f"{tuple(ref.shape)}")


def _load_sharded(ckpt: str, kind: str, like: dict, what: str) -> dict:
    """Whole tensors of a sharded checkpoint (thcore/shards.py), checked as `_load_tensors` checks them."""
    from .shards import INDEX, Reader
    try:
        reader = Reader(ckpt)
        shapes = {k: reader.shape(kind, k) for k in reader.names(kind)}
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{os.path.join(ckpt, INDEX)}: unreadable ({e.__class__.__name__}: {e})") from None
    check_fits(ckpt, what, shapes, like)
    out = {}
    for k, ref in like.items():
        try:
            out[k] = reader.read(kind, k).to(device=ref.device, dtype=ref.dtype)
        except Exception as e:   # SafetensorError, a missing part
            raise CheckpointError(f"{ckpt}: {what} {k!r}: unreadable ({str(e).strip().splitlines()[0]})") from None
    return out


def is_sharded(ckpt: str) -> bool:
    from .shards import INDEX
    return os.path.isfile(os.path.join(ckpt, INDEX))


def has_params(ckpt: str) -> bool:
    """Does checkpoint (or export) dir `ckpt` hold params: model.safetensors, or a sharded checkpoint's?"""
    return os.path.isfile(os.path.join(ckpt, "model.safetensors")) or is_sharded(ckpt)


def read_params(ckpt: str) -> dict:
    """Every param of `ckpt`, whole, as saved (either layout)."""
    if is_sharded(ckpt):
        from .shards import Reader
        return Reader(ckpt).read_all("model")
    return _load_tensors(os.path.join(ckpt, "model.safetensors"), None, "param")


def load_params(ckpt: str, like: dict) -> dict:
    """The params of checkpoint (or exported) directory `ckpt`, checked against the names/shapes of `like`."""
    if is_sharded(ckpt):
        return _load_sharded(ckpt, "model", like, "param")
    return _load_tensors(os.path.join(ckpt, "model.safetensors"), like, "param")


def read_meta(ckpt: str, state) -> dict:
    """state.json of `ckpt`, checked to carry what `state.with_meta` needs."""
    path = os.path.join(ckpt, "state.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        state.with_meta(meta)   # the fields it needs are there and have the right types
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid state.json ({e.__class__.__name__}: {e})") from None
    return meta


def load(state, ckpt: str):
    """`state` with params, optimizer state and metadata from checkpoint dir `ckpt` (verified first)."""
    verify(ckpt)
    meta = read_meta(ckpt, state)
    params = load_params(ckpt, state.params)
    opt_like = tree.flatten(state.opt_state)
    opt = tree.unflatten(_load_sharded(ckpt, "optimizer", opt_like, "optimizer tensor") if is_sharded(ckpt) else
                         _load_tensors(os.path.join(ckpt, "optimizer.safetensors"), opt_like, "optimizer tensor"))
    ema = state.ema
    if ema is not None:   # a checkpoint from before EMA was switched on: the EMA starts at its params
        path = os.path.join(ckpt, "ema.safetensors")
        ema = _load_tensors(path, state.ema, "ema param") if os.path.isfile(path) else tree.clone(params)
    return state.replace(params=params, opt_state=opt, ema=ema).with_meta(meta), meta


def inside_run(ckpt: str, run_dir: str) -> bool:
    """Is checkpoint dir `ckpt` one of `run_dir`'s own (symlinks resolved)? DeepSpeed's shard files are pickles,
    loaded only from there (docs/RELIABILITY.md)."""
    root = os.path.realpath(root_of(run_dir))
    return os.path.realpath(ckpt).startswith(root + os.sep)


def resolve(resume: str, run_dir: str) -> list[str]:
    """Checkpoints to try for `resume` ('auto' | 'never' | a run dir | a checkpoint dir), newest first."""
    if resume == "never":
        return []
    if resume == "auto":
        return candidates(root_of(run_dir))
    if os.path.isfile(os.path.join(resume, "state.json")):
        return [resume]
    found = candidates(root_of(resume)) or candidates(resume)
    if not found:
        raise ConfigError(f"resume={resume!r}: no checkpoint found there")
    return found


def incompatible(e: IncompatibleCheckpoint, resume: str) -> IncompatibleCheckpoint:
    """The one line for a complete checkpoint that another model wrote."""
    own = "the run's own config.json records the fields it was trained with; " if resume == "auto" else ""
    return IncompatibleCheckpoint(f"{e}: the checkpoint was written by a model with other settings; {own}resume "
                                  "with those settings, or train these ones into a new out_dir")


def none_complete(paths: list[str], resume: str = "auto") -> CheckpointError:
    """The one line when every checkpoint to resume from is damaged (each was named in a warning before)."""
    if resume != "auto":
        what = f"resume={resume!r}: " + ("the checkpoint is damaged" if len(paths) == 1 else
                                          f"none of its {len(paths)} checkpoints is complete")
        return CheckpointError(f"{what} (see the warnings above); name a complete checkpoint")
    return CheckpointError(f"{os.path.dirname(paths[0])}: none of its {len(paths)} checkpoints is complete (see the "
                           "warnings above): nothing was changed; restore them from a copy, or start afresh with "
                           "another out_dir")


def restore(state, paths: list[str], log=print, resume: str = "auto"):
    """Load the newest complete checkpoint among `paths`, skipping damaged ones with a one-line warning; a
    complete checkpoint that does not fit the model is an error (IncompatibleCheckpoint), never skipped.

    Returns (state, meta, path) or (state, None, None) when there is nothing to resume from."""
    for p in paths:
        try:
            new, meta = load(state, p)
            return new, meta, p
        except IncompatibleCheckpoint as e:
            raise incompatible(e, resume) from None
        except CheckpointError as e:
            log(f"warning: skipping checkpoint: {e}", file=sys.stderr)
    if paths:   # never silently start over (and later prune) a run whose checkpoints all fail to load
        raise none_complete(paths, resume)
    return state, None, None


def newest_complete(paths: list[str], what: str, log=print) -> str:
    """The first of `paths` (newest first) that verifies; each damaged one skipped is named in one warning line."""
    for p in paths:
        try:
            verify(p)
            return p
        except CheckpointError as e:
            log(f"warning: skipping checkpoint: {e}", file=sys.stderr)
    raise CheckpointError(f"{what}: none of its {len(paths)} checkpoints is complete (see the warnings above)")


def pick(run_dir: str, which: str = "", prefer: str = "latest", log=print) -> str:
    """The checkpoint dir a command reads (generate, export, translate, eval): `which` is '' (then `prefer`:
    'latest', or 'best' = the best one the newest complete checkpoint records, else that one), 'best', 'latest'
    or a checkpoint dir. A damaged checkpoint is never read: skipped with a one-line warning when the choice was
    the command's, an error when it was the user's (an explicit dir, or 'best')."""
    if which and which not in ("best", "latest"):
        if os.path.isfile(os.path.join(which, MANIFEST)):   # exported dirs carry no manifest: nothing to check
            verify(which)
        return which
    paths = candidates(root_of(run_dir))
    if not paths:
        raise ConfigError(f"{run_dir}: no checkpoint found")
    newest = newest_complete(paths, run_dir, log)
    if (which or prefer) == "latest":
        return newest
    with open(os.path.join(newest, "state.json")) as f:
        step = json.load(f).get("best_step")
    best = os.path.join(root_of(run_dir), f"step_{step}") if step is not None else None
    if best is None or not os.path.isdir(best):
        if which == "best":
            raise ConfigError(f"{run_dir}: no best checkpoint recorded (no eval has run)")
        return newest
    try:
        verify(best)
    except CheckpointError as e:
        if which == "best":
            raise
        log(f"warning: skipping the best checkpoint: {e}; using the newest complete one, {newest}", file=sys.stderr)
        return newest
    return best
