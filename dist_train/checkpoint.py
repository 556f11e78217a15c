"""Checkpoints: written atomically, kept in rotation, checked before a resume, loaded without pickle.

Layout of `<run dir>/checkpoints/`:

    latest                  the name of the newest complete checkpoint (one line)
    step_00000200/          the state after optimizer step 200
        manifest.json       written last: every file of the checkpoint with its size and SHA-256
        checkpoint.pt       single process, DDP, Accelerate: everything, whole, written by rank 0
        trainer.pt          FSDP2, DeepSpeed: the trainer's state (rank 0), beside the strategy's files:
        .metadata, __*.distcp   FSDP2: torch.distributed.checkpoint, every rank writes its shards
        mp_rank_*, *optim_states.pt   DeepSpeed: the engine's own files, every rank its partitions

Writing (every rank takes part): the strategy writes into `.tmp-step_N/`; the
ranks agree that every write succeeded and hash a share of the files each; rank
0 writes the manifest, renames the folder to `step_N/`, then points `latest` at
it (a temporary file renamed onto it) and removes all but the newest
`train.keep_checkpoints`. A crash at any moment leaves either the previous
checkpoints alone or the new one complete. A checkpoint leaves the set in one
step too: its folder is renamed to a hidden `.trash-step_N/`, which nothing
reads as a checkpoint, and only then deleted; the next start removes what a
crash left of that (`remove_leftovers`).

Resuming: the ranks walk the checkpoints newest first, each checking its share
of the files against the manifest (size and hash), and take the first intact
one; rank 0 warns about each one passed over (truncated, corrupt, incomplete). Every `.pt` file is read with
`torch.load(weights_only=True)`; a file that needs arbitrary pickle is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from dist_train.errors import UsageError, describe
from dist_train.rundir import atomic_path

log = logging.getLogger("dist_train")

DIR = "checkpoints"
LATEST = "latest"
#: How the temporary files of a save are named in the checkpoints folder: a save's folder before its rename
#: (`.tmp-step_N`), `latest`'s replacement before its rename, a checkpoint on its way out (`.trash-step_N`).
#: The startup cleanup removes these and nothing else.
TMP, LATEST_TMP, TRASH = ".tmp-", ".tmp-latest-", ".trash-"
MANIFEST = "manifest.json"
TRAINER = "trainer.pt"
#: The checkpoint layout and meaning. 2: the data order is the on-demand shuffle (dist_train.shuffle),
#: so a step of a format-1 checkpoint addresses other samples.
FORMAT = 2
_NAME = re.compile(r"^step_(\d{8,})$")
#: Config keys whose value decides the trajectory: a resume must not change them.
TRAJECTORY_KEYS = ("model", "data", "train.global_batch_size", "train.seed")
#: Keys inside TRAJECTORY_KEYS a resumed run may change: batches left out after the checkpoint's step (the
#: trainer checks that the batches before it are those the checkpoint trained on).
RESUMABLE_KEYS = ("data.skip_steps", "data.skip_steps_file")


class UnsafeCheckpoint(UsageError):
    """A checkpoint file that holds objects only arbitrary pickle could rebuild."""


def name_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> Optional[int]:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def checkpoints_in(root: Path) -> list[Path]:
    """The complete-looking checkpoint folders under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p), reverse=True)  # type: ignore[arg-type, return-value]


# ---- integrity ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_files(folder: Path, rank: int = 0, world: int = 1) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of this rank's share of the checkpoint's files (every world-th, from `rank`):
    the ranks hash a checkpoint together, so no rank reads it all while the others wait."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in _files(folder)[rank::world]}


def write_manifest(folder: Path, step: int, extra: dict[str, Any], files: Optional[dict[str, Any]] = None) -> None:
    """The manifest, written last (atomically): `files` as the ranks hashed them, or all hashed here."""
    files = hash_files(folder) if files is None else files
    text = json.dumps({"format": FORMAT, "step": step, **extra, "files": dict(sorted(files.items()))}, indent=1) + "\n"
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def problem(folder: Path, rank: int = 0, world: int = 1) -> Optional[str]:
    """Why the checkpoint in `folder` cannot be used (None: fine), checking the manifest and this rank's
    share of the files it lists (every world-th): each rank checks its share, and the answers are joined."""
    try:
        manifest = read_manifest(folder)
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            return "its manifest lists no files"
    except FileNotFoundError:
        return "it has no manifest.json (it was never completed)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest.json is unreadable ({type(e).__name__})"
    for rel, want in sorted(files.items())[rank::world]:
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want.get("bytes"):
            return f"{rel} is truncated or changed ({size} bytes, {want.get('bytes')} written)"
        if _sha256(p) != want.get("sha256"):
            return f"{rel} is corrupt (its SHA-256 differs from the one written)"
    return None


Check = Callable[[Path], Optional[str]]


def newest_valid(root: Path, check: Check = problem, warn: bool = True) -> Optional[Path]:
    """The newest checkpoint under `root` that passes `check`; a warning for each newer one skipped."""
    for folder in checkpoints_in(root):
        why = check(folder)
        if why is None:
            return folder
        if warn:
            log.warning("checkpoint %s cannot be used: %s; trying the previous one", folder, why)
    return None


def _holds_a_run(out_dir: Path) -> bool:
    return (out_dir / "metrics.jsonl").exists() or bool(checkpoints_in(out_dir / DIR))


def resolve_resume(resume: str, out_dir: Path, check: Check = problem, warn: bool = True
                   ) -> tuple[Optional[Path], Optional[str]]:
    """(the checkpoint folder to resume from, the run's origin) for `train.resume`; (None, None): step 0.

    - `auto`: the newest intact checkpoint in this run's directory.
    - a path (a checkpoint folder, or a run directory: its newest intact one): that checkpoint, which
      becomes the run's origin, saved in its checkpoints' manifests. A job started with it that is
      requeued (the same arguments again) continues from its own newer checkpoints of that origin
      instead of starting over; a rollback within this run (a path among its own checkpoints) discards
      the newer ones.

    Every rank calls this (`check` may be collective); only errors every rank finds alike are raised.
    """
    own = out_dir / DIR
    if resume == "none":
        return None, None
    if resume == "auto":
        found = newest_valid(own, check, warn)
        return found, (read_manifest(found).get("resumed_from") if found is not None else None)
    p = Path(resume)
    origin = str(p.resolve())
    mine = next(iter(checkpoints_in(own)), None)
    if mine is not None and _origin(mine) == origin:  # this job's own progress from that origin
        found = newest_valid(own, check, warn)
        if found is not None and _origin(found) == origin:
            return found, origin
    if not p.is_dir() and not p.exists() and (step_of(p) is not None or p.parent.name == DIR):
        raise UsageError(f"train.resume: the checkpoint '{p}' does not exist (a run keeps only its newest "
                         f"train.keep_checkpoints); {_listing(p.parent)}")
    if not p.is_dir():
        raise UsageError(f"train.resume: '{p}' is not a directory; pass a checkpoint folder "
                         "(<run>/checkpoints/step_N), a run directory, auto or none")
    if step_of(p) is not None or (p / MANIFEST).exists():
        why = check(p)
        if why is not None:
            raise UsageError(f"train.resume: the checkpoint '{p}' cannot be used: {why}; pass another checkpoint "
                             "or train.resume=auto")
        requested = p
    else:
        roots = [r for r in (p / DIR, p) if checkpoints_in(r)]
        if not roots:
            raise UsageError(f"train.resume: '{p}' is neither a checkpoint (a step_N folder) nor a run directory "
                             "holding checkpoints; pass one, or train.resume=auto")
        requested = newest_valid(roots[0], check, warn)  # type: ignore[assignment]
        if requested is None:
            raise UsageError(f"train.resume: no checkpoint in '{roots[0]}' is intact (see the warnings above)")
        origin = str(requested.resolve())
    inside = requested.resolve().parent == own.resolve()
    if not inside and _holds_a_run(out_dir):
        raise UsageError(f"train.resume: run.out_dir '{out_dir}' holds another run; to start from '{p}' choose a new "
                         "run.out_dir (train.resume=auto continues the run that is there)")
    return requested, origin


def _listing(root: Path, most: int = 8) -> str:
    """What a train.resume naming a missing checkpoint of `root` can take instead, for its error."""
    names = [f.name for f in checkpoints_in(root)]
    if not names:
        return f"there is no checkpoint in '{root}'; pass another checkpoint folder, a run directory, auto or none"
    shown = ", ".join(reversed(names[:most])) + (f" (and {len(names) - most} older)" if len(names) > most else "")
    return f"checkpoints there: {shown}; pass one of them, a run directory, auto or none"


def _origin(folder: Path) -> Optional[str]:
    try:
        return read_manifest(folder).get("resumed_from")
    except (OSError, ValueError):
        return None


# ---- writing ------------------------------------------------------------------------------------
def begin(root: Path, step: int) -> Path:
    """Rank 0: an empty temporary folder for the checkpoint of `step`."""
    tmp = root / f"{TMP}{name_of(step)}"
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)  # a save that crashed half-way
    tmp.mkdir()
    return tmp


def commit(root: Path, tmp: Path, step: int, keep: int, extra: dict[str, Any], files: dict[str, Any]) -> Path:
    """Rank 0, after every rank wrote its files and hashed its share: manifest, rename, `latest`, rotation."""
    write_manifest(tmp, step, extra, files)
    final = root / name_of(step)
    if final.exists():  # the same step saved again (a run resumed from it, stopped before its next step)
        _discard(final)
    os.replace(tmp, final)
    _point_latest(root, final.name)
    for old in checkpoints_in(root)[keep:]:
        if old != final:
            with contextlib.suppress(OSError):  # one that cannot be removed stays, complete
                _discard(old)
    return final


def _point_latest(root: Path, name: Optional[str]) -> None:
    """`latest` names the checkpoint `name` (replaced atomically), or is removed (None)."""
    if name is None:
        (root / LATEST).unlink(missing_ok=True)
        return
    with atomic_path(root / LATEST, prefix=LATEST_TMP) as t:
        t.write_text(name + "\n", encoding="utf-8")


def _discard(folder: Path) -> None:
    """Take a checkpoint out of the set in one step (a rename to a hidden name nothing reads as a checkpoint),
    then delete it: a crash half-way through the deletion leaves a `.trash-` folder, never a partial
    checkpoint."""
    trash = folder.parent / f"{TRASH}{folder.name}"
    if trash.exists():  # what a crash left of an earlier removal of the same step
        shutil.rmtree(trash)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def drop_newer(root: Path, step: int) -> list[str]:
    """A run resumed from `step` discards what came after it: the checkpoints of later steps (ones that
    failed their check, or an abandoned continuation). Returns their names."""
    found = checkpoints_in(root)
    newer = [f for f in found if step_of(f) > step]  # type: ignore[operator]
    if newer:  # `latest` first, so that it never names a checkpoint already gone
        _point_latest(root, next((f.name for f in found if f not in newer), None))
    for folder in newer:
        with contextlib.suppress(OSError):
            _discard(folder)
    return [f.name for f in newer]


def remove_leftovers(root: Path) -> None:
    """At a start, what a crash left: the temporary folders of saves that never completed (`.tmp-step_N`),
    of checkpoints taken out of the set (`.trash-step_N`), `latest`'s replacement file (`.tmp-latest-*`);
    and `latest` pointed at the newest checkpoint again. Nothing else in the folder is touched."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink() and (p.name.startswith(TMP) or p.name.startswith(TRASH)) \
                and step_of(Path(p.name.split("-", 1)[1])) is not None:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(LATEST_TMP) and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
    newest = next((f.name for f in checkpoints_in(root)), None)
    try:
        current: Optional[str] = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != newest and (newest is not None or (root / LATEST).exists()):
        _point_latest(root, newest)


# ---- loading without pickle ---------------------------------------------------------------------
def _written_by_torch_save(path: Path) -> bool:
    """Whether `path` begins as a file of torch.save does: a zip archive (torch's format since 1.6), or the
    legacy format's pickled magic number. Anything else is not a checkpoint, whatever unpickling it says."""
    import torch

    with open(path, "rb") as f:
        head = f.read(64)
    legacy = (pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p)
              for p in range(2, pickle.HIGHEST_PROTOCOL + 1))
    return head.startswith(b"PK\x03\x04") or any(head.startswith(m) for m in legacy)


def safe_load(path: Path, allow: Iterable[Any] = ()) -> Any:
    """torch.load with weights_only=True (tensors, numbers, strings and containers; plus `allow`)."""
    import torch

    try:
        if not _written_by_torch_save(path):
            raise UsageError(f"'{path}' is not a checkpoint (not a file torch.save wrote: neither a zip archive "
                             "nor torch's legacy format); pass another checkpoint folder to train.resume, or restore "
                             "this file from a copy")
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if str(e) else "unknown object"
        raise UnsafeCheckpoint(f"refusing to load '{path}': it holds objects that need arbitrary pickle ({what}); "
                               "dist_train loads checkpoints with weights_only=True; use a checkpoint written by "
                               "dist-train, or resume from another one") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UsageError(f"cannot read checkpoint file '{path}' ({str(e).splitlines()[0] if str(e) else e})") \
            from None


# ---- random states ------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's random generators (torch CPU, CUDA, Python's `random`)."""
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x: Any) -> Any:
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuple(x: Any) -> Any:
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


# ---- compatibility -----------------------------------------------------------------------------
def _select(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The trajectory-defining config keys whose value differs between a checkpoint's config and this run's."""
    out = []
    for key in TRAJECTORY_KEYS:
        a, b = _select(saved, key), _select(now, key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k) and f"{key}.{k}" not in RESUMABLE_KEYS]
        elif a != b:
            out.append(key)
    return out


def check_dcp_metadata(folder: Path) -> None:
    """torch.distributed.checkpoint reads its `.metadata` with plain pickle, and any non-tensor entry with
    torch.load(weights_only=False). Read the metadata first with an unpickler that builds only DCP's own
    metadata classes and torch's dtypes, and require every entry to be a tensor, so neither ever unpickles
    an arbitrary object."""
    import torch
    from torch.distributed.checkpoint import metadata as M
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    allowed = {(c.__module__, c.__qualname__): c for c in (
        M.Metadata, M.TensorStorageMetadata, M.ChunkStorageMetadata, M.TensorProperties, M.BytesStorageMetadata,
        M.MetadataIndex, M.StorageMeta, M._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size)}

    class Forbidden(pickle.UnpicklingError):
        """A class the metadata may not hold (not a damaged file: a file that asks for more than data)."""

    class Restricted(pickle.Unpickler):  # Python's documented way to restrict what unpickling may build
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in allowed:
                return allowed[(module, name)]
            if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                               torch.memory_format)):
                return getattr(torch, name)
            if (module, name) in (("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")):  # StorageMeta's path
                return getattr(__import__("pathlib"), name)
            if (module, name) == ("torch.serialization", "_get_layout"):  # a lookup of torch.strided etc. by name
                return torch.serialization._get_layout
            if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")):
                return {"OrderedDict": __import__("collections").OrderedDict, "set": set, "frozenset": frozenset}[name]
            raise Forbidden(f"{module}.{name} is not allowed")

    path = folder / ".metadata"
    try:
        with open(path, "rb") as f:
            meta = Restricted(f).load()
    except Forbidden as e:
        raise UnsafeCheckpoint(f"refusing to load '{path}': it holds objects that need arbitrary pickle "
                               f"({str(e).splitlines()[0]}); use a checkpoint written by dist-train") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint file '{path}' ({e})") from None
    except Exception as e:  # damaged bytes make unpickling fail in any of many ways
        raise UsageError(f"'{path}' is not a checkpoint (not torch.distributed.checkpoint metadata: unpickling it "
                         f"failed, {describe(e)}); pass another checkpoint folder to train.resume, or restore this "
                         "file from a copy") from None
    if not isinstance(meta, M.Metadata):
        raise UnsafeCheckpoint(f"refusing to load '{path}': it is not torch.distributed.checkpoint metadata")
    others = [k for k, v in meta.state_dict_metadata.items() if not isinstance(v, M.TensorStorageMetadata)]
    if others:
        raise UnsafeCheckpoint(f"refusing to load '{folder}': entries {', '.join(others[:3])} are not tensors and "
                               "would be unpickled without restriction; use a checkpoint written by dist-train")
