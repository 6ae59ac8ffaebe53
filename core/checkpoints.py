"""Which checkpoints a run may resume from: complete ones only.

transformers writes a checkpoint folder in place, file by file, and resumes from the highest step; a
process killed during a save (a preemption, a full disk) leaves a folder with some files missing or
truncated. posttrain writes a marker, ``posttrain-complete.json``, into a checkpoint once every file
of it is saved (the trainer's, the critic's), and resumes only from the newest folder that has one.
A folder without the marker (one written before posttrain wrote markers, or by a save that was cut
off right after its last file) counts as complete only if every file it needs is there and
readable: ``trainer_state.json`` parses, every ``.pt``/``.bin`` file's zip index and every
``.safetensors`` file's header are whole. Incomplete folders are skipped with a line saying why, and
never deleted.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from .errors import UserError

MARKER = "posttrain-complete.json"
PREFIX = "checkpoint-"


def step_of(folder: Path) -> int:
    try:
        return int(folder.name[len(PREFIX):])
    except ValueError:
        return -1


def mark_complete(folder: Path, step: int) -> None:
    """Write the marker, last: a listing of the folder's files and their sizes."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    tmp = folder / (MARKER + ".partial")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
    tmp.rename(folder / MARKER)


def _safetensors_whole(path: Path) -> bool:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return False
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + (max(ends) if ends else 0) <= size


def why_incomplete(folder: Path) -> str | None:
    """None for a complete checkpoint, else what is wrong with it."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError):
            return f"its {MARKER} is unreadable"
        for name, size in listed.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were saved"
        return None
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing (the save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except ValueError:
        return "trainer_state.json is truncated"
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix in (".pt", ".bin", ".pth") and path.stat().st_size:
                with zipfile.ZipFile(path) as z:
                    z.infolist()
            elif path.suffix == ".safetensors" and not _safetensors_whole(path):
                return f"{path.relative_to(folder)} is truncated"
        except (zipfile.BadZipFile, OSError, ValueError):
            return f"{path.relative_to(folder)} is truncated or unreadable"
    return None


def newest_complete(run_dir: Path, say=print) -> Path | None:
    """The newest complete checkpoint of a run folder, saying which incomplete ones were skipped and why;
    None when it has none at all. Checkpoints that exist but are all incomplete are an error naming the
    folder (resuming from the start would silently lose them)."""
    folders = sorted((p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir() and step_of(p) >= 0),
                     key=step_of, reverse=True)
    skipped = []
    for folder in folders:
        reason = why_incomplete(folder)
        if reason is None:
            if skipped:
                say(f"posttrain: resuming from {folder.name}; skipped " + "; ".join(skipped) + " (left in place)")
            return folder
        skipped.append(f"{folder.name} ({reason})")
    if folders:
        raise UserError(f"'{run_dir}' has no complete checkpoint to resume from: " + "; ".join(skipped),
                        field="--resume",
                        fix="start the run again with --overwrite, or restore a complete checkpoint into the folder")
    return None


# -- run folders a new run may replace --------------------------------------------------------------------

KEPT_NAMES = ("summary.json", "final", "preempted.json")


def worth_keeping(run_dir: Path) -> bool:
    """Whether a run folder holds anything a failed start would lose: a summary, a model (``final/``, a
    checkpoint, any .safetensors file), a preemption record. A folder that only holds a recipe, metrics or a
    round's samples is what a run that failed before its first checkpoint leaves."""
    for path in run_dir.rglob("*"):
        if path.name in KEPT_NAMES or path.name.startswith(PREFIX) or path.suffix == ".safetensors":
            return True
    return False


def replaceable(run_dir: Path) -> bool:
    """A folder a new run may take over without --overwrite: a posttrain run (it has a recipe.yaml) that
    failed before it had anything worth keeping."""
    return (run_dir / "recipe.yaml").is_file() and not worth_keeping(run_dir)


_set_aside: list[tuple[Path, Path]] = []  # (run folder, where its earlier run waits) while the new run starts


def set_aside(run_dir: Path) -> Path:
    """Move an earlier run out of the way of --overwrite, to be deleted once the new run's data passed its
    checks (data_checked) or put back if the new run fails before that (restore_set_aside)."""
    import os

    aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    if aside.exists():
        import shutil

        shutil.rmtree(aside)
    run_dir.rename(aside)
    _set_aside.append((run_dir, aside))
    return aside


def data_checked() -> None:
    """The new run's data loaded and passed its checks: the runs it replaces are deleted now."""
    import shutil

    while _set_aside:
        run_dir, aside = _set_aside.pop()
        shutil.rmtree(aside, ignore_errors=True)
        print(f"posttrain: the earlier run in {run_dir} is replaced (--overwrite)", flush=True)


def restore_set_aside() -> list[Path]:
    """The new run failed before its data passed: put the earlier runs back (returns their folders)."""
    import shutil

    restored = []
    while _set_aside:
        run_dir, aside = _set_aside.pop()
        shutil.rmtree(run_dir, ignore_errors=True)
        aside.rename(run_dir)
        restored.append(run_dir)
    return restored
