"""Output folders: one guard for every pass, then a temporary folder beside the target renamed into place.

What kvconvert wrote into an output folder is listed in its `kvconvert.json` (`output.files`: relative path ->
size, and `output.kind`). A folder holding anything else (a user's notes, sub-folders, a file changed since)
is not kvconvert's to replace: `overwrite=True` refuses it, `overwrite=FOREIGN` (`--overwrite-foreign`)
deletes it too, except the current folder, the home folder and their ancestors, which are only ever replaced
when they hold nothing but a previous kvconvert output of the same kind. Temporary folders carry the writer's
pid (`.<name>.kvconvert-tmp-<pid>-*`, `.<name>.kvconvert-old-<pid>-*`): a later run on the same target removes
those whose process is gone (a SIGKILL leaves them) and names the others in one line.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import UserError
from . import provenance

log = logging.getLogger(__name__)

FOREIGN = "foreign"  # overwrite=FOREIGN: replace the folder even if it holds files kvconvert did not write
TMP_MARK = ".kvconvert-tmp-"
OLD_MARK = ".kvconvert-old-"
KIND_OF_PASS = {"mha_to_gqa": "checkpoint", "fit_latent": "checkpoint", "heal": "checkpoint",
                "export_onnx": "onnx", "export_engine": "engine", "export_triton": "triton"}
_LEFTOVER = re.compile(r"^\.(?P<name>.*)\.kvconvert-(?:tmp|old)-(?:(?P<pid>\d+)-)?[^/]*$")
_SHOWN = 8


@dataclass
class Survey:
    """What an existing target folder holds: `ours` (listed in its kvconvert.json, unchanged) and `foreign`
    (everything else, relative paths); `kind` of the kvconvert output it holds, if any."""

    target: Path
    ours: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    kind: str | None = None

    @property
    def empty(self) -> bool:
        return not self.ours and not self.foreign


def output_kind(record: Any) -> str | None:
    """'checkpoint', 'onnx', 'engine', 'triton' (or the last pass name) of a kvconvert.json record."""
    if not isinstance(record, dict):
        return None
    out = record.get("output")
    if isinstance(out, dict) and isinstance(out.get("kind"), str):
        return out["kind"]
    passes = record.get("passes")
    if isinstance(passes, list) and passes and isinstance(passes[-1], dict):
        name = str(passes[-1].get("pass"))
        return KIND_OF_PASS.get(name, name)
    return None


def _shown(names: list[str]) -> str:
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _read_record(folder: Path) -> dict | None:
    try:
        record = provenance.read(folder)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "kvconvert" else None


def survey(target: Path) -> Survey:
    """Sort the files of an existing folder into kvconvert's own (its kvconvert.json lists them with their
    size) and foreign ones. Without a kvconvert.json only the top-level names are listed (no walk of $HOME)."""
    target = Path(target)
    result = Survey(target)
    record = _read_record(target)
    listed = record.get("output", {}).get("files") if record else None
    if not isinstance(listed, dict):
        result.foreign = sorted(p.name for p in target.iterdir() if not _LEFTOVER.match(p.name))
        result.kind = output_kind(record) if record else None
        return result
    result.kind = output_kind(record)
    holds_files: set[str] = set()
    for root, dirs, files in os.walk(target):
        rel_root = Path(root).relative_to(target)
        if root == str(target):
            files = [f for f in files if not _LEFTOVER.match(f)]
            dirs[:] = [d for d in dirs if not _LEFTOVER.match(d)]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = (rel_root / name).as_posix()
            holds_files.update(p.as_posix() for p in Path(rel).parents if str(p) != ".")
            path = Path(root) / name
            if rel == provenance.FILENAME or (path.is_file() and listed.get(rel) == path.stat().st_size):
                result.ours.append(rel)
            else:
                result.foreign.append(rel)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    for root, dirs, files in os.walk(target):
        if root == str(target):
            dirs[:] = [d for d in dirs if not _LEFTOVER.match(d)]
        for d in dirs:
            rel = (Path(root).relative_to(target) / d).as_posix()
            if rel not in holds_files and not os.listdir(os.path.join(root, d)):
                result.foreign.append(rel + "/")
    result.ours.sort()
    result.foreign.sort()
    return result


def _protected(target: Path) -> str | None:
    """Why `target` must never be emptied by kvconvert (None if it may be)."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor):
        return "the file-system root"
    if cwd.is_relative_to(target):
        return "the current folder" if cwd == target else "a folder above the current one"
    if home.is_relative_to(target):
        return "your home folder" if home == target else "a folder above your home folder"
    return None


def _check_parents(target: Path) -> None:
    for p in (target, *target.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "exists and is a file" if p == target else f"cannot be made: {p} is a file, not a folder"
                raise UserError(f"output {target} {what}; choose another --out folder")
            return


def check_target(target: str | os.PathLike, overwrite: bool | str = False, inputs: tuple[Path, ...] = (),
                 kind: str | None = None) -> Survey | None:
    """Refuse an output folder kvconvert may not write (one `UserError` line saying what to do).

    Refused: an empty name; a target that is, contains or is inside an input; a path through a file; a
    folder that is not empty unless `overwrite` and it holds only kvconvert's own files (of `kind`, when
    given) or `overwrite == FOREIGN`; the current or home folder (or an ancestor) unless it holds only a
    previous kvconvert output. Returns the survey of an existing non-empty target (None otherwise).
    """
    if os.fspath(target) == "":
        raise UserError("--out is empty (an unset shell variable?); name the output folder")
    target = Path(target).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if target == inp or inp.is_relative_to(target) or target.is_relative_to(inp):
            raise UserError(f"output {target} overlaps the input {inp}; choose another --out folder")
    _check_parents(target)
    _leftovers(target, remove=False)
    if not target.is_dir():
        return None
    found = survey(target)
    if found.empty:
        return found
    protected = _protected(target)
    other_kind = kind is not None and found.kind is not None and found.kind != kind
    if protected and (found.foreign or found.kind is None or other_kind):
        what = f"files kvconvert did not write ({_shown(found.foreign)})" if found.foreign else \
            f"a kvconvert {found.kind} output, not a {kind}" if other_kind else "no kvconvert output"
        raise UserError(f"--out {target} is {protected} and holds {what}; kvconvert never replaces it: "
                        "choose a new folder, e.g. --out ./converted")
    if not overwrite:
        held = f"a previous kvconvert {found.kind} output; pass --overwrite to replace it" \
            if found.kind and not found.foreign else \
            f"files kvconvert did not write ({_shown(found.foreign)}); choose another folder"
        raise UserError(f"output folder {target} is not empty: it holds {held}")
    if other_kind and overwrite != FOREIGN:
        raise UserError(f"output folder {target} holds a kvconvert {found.kind} output, not a {kind}; choose "
                        "another --out folder (or pass --overwrite-foreign to delete it)")
    if found.foreign and overwrite != FOREIGN:
        raise UserError(f"--overwrite would delete files kvconvert did not write in {target}: "
                        f"{_shown(found.foreign)}; move them away, choose another --out folder, or pass "
                        "--overwrite-foreign to delete them too")
    return found


@contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool | str = False, inputs: tuple[Path, ...] = (),
                      kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target`, on any error (Ctrl-C too) it vanishes.

    The guard (`check_target`) runs before the folder is made and again just before the replacement. The
    finished folder's kvconvert.json lists every file written (`output.files`) and the output's `kind`
    (from `kind` or its last pass); the folder's mode follows the umask.
    """
    if os.fspath(target) != "":
        _leftovers(Path(target).resolve(), remove=True)
    check_target(target, overwrite, inputs, kind)
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        made = _stamp(tmp, kind)
        found = check_target(target, overwrite, inputs, made)
        _replace(target, tmp, found)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stamp(folder: Path, kind: str | None) -> str | None:
    """List every file of `folder` (relative path -> size) in its kvconvert.json; returns the output kind."""
    record = provenance.read(folder) or {"tool": "kvconvert", "version": __version__}
    kind = kind or output_kind(record)
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != provenance.FILENAME:
            files[rel] = p.stat().st_size
    record["output"] = {"kind": kind, "files": files}
    provenance.write(folder, record)
    return kind


def _replace(target: Path, tmp: Path, found: Survey | None) -> None:
    if found is None or not target.exists():
        tmp.rename(target)
        return
    if not found.empty:
        removed = found.ours + found.foreign
        log.warning("kvconvert: replacing %s: removing %d files (%s%s)", target, len(removed), _shown(removed),
                    f"; {len(found.foreign)} not written by kvconvert" if found.foreign else "")
    in_place = Path.cwd().resolve().is_relative_to(target) or os.path.ismount(target)
    if found.empty and not in_place:
        try:
            os.rename(tmp, target)  # replaces an empty folder
            return
        except OSError:
            pass
    if not in_place:
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}{os.getpid()}-", dir=target.parent))
        try:
            _rename_dir(target, trash / "old")
        except OSError as exc:
            shutil.rmtree(trash, ignore_errors=True)
            if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EINVAL):
                raise
        else:
            try:
                tmp.rename(target)
            except BaseException:
                try:  # put the previous output back; if that fails too, the trash keeps it (named by the next run)
                    (trash / "old").rename(target)
                    trash.rmdir()
                except OSError:
                    pass
                raise
            shutil.rmtree(trash, ignore_errors=True)
            return
    _replace_entries(target, tmp)


def _rename_dir(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _replace_entries(target: Path, tmp: Path) -> None:
    """Replace the contents of `target` but not the folder itself (the current folder, a mount point)."""
    same_fs = os.stat(target).st_dev == os.stat(target.parent).st_dev
    where = target.parent if same_fs else target
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}{os.getpid()}-", dir=where))
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for entry in sorted(target.iterdir()):
            if entry != trash:
                shutil.move(str(entry), str(trash / entry.name))
                moved_old.append(entry.name)
        for entry in sorted(tmp.iterdir()):
            shutil.move(str(entry), str(target / entry.name))
            moved_new.append(entry.name)
    except BaseException:
        try:  # put the previous output back; if that fails too, the trash folder keeps it (named by the next run)
            for name in moved_new:
                shutil.move(str(target / name), str(tmp / name))
            for name in moved_old:
                shutil.move(str(trash / name), str(target / name))
            trash.rmdir()
        except OSError:
            pass
        raise
    shutil.rmtree(trash, ignore_errors=True)
    tmp.rmdir()


def _leftovers(target: Path, remove: bool) -> None:
    """Temporary folders an earlier run on `target` left behind: removed when their process is gone
    (`remove`), named in one line otherwise."""
    places = [target.parent] + ([target] if target.is_dir() else [])
    for place in places:
        try:
            entries = list(place.iterdir()) if place.is_dir() else []
        except OSError:
            continue
        for entry in entries:
            m = _LEFTOVER.match(entry.name)
            if not m or not entry.is_dir() or (place == target.parent and m["name"] != target.name):
                continue
            pid = int(m["pid"]) if m["pid"] else None
            if pid is not None and pid != os.getpid() and not _alive(pid):
                if remove and OLD_MARK in entry.name and (entry / "old").is_dir() and not target.exists():
                    (entry / "old").rename(target)  # killed between the two renames: the previous output is back
                    log.warning("kvconvert: restored %s from %s, left by an interrupted kvconvert run (pid %d)",
                                target, entry, pid)
                if remove:
                    shutil.rmtree(entry, ignore_errors=True)
                    log.warning("kvconvert: removed %s, left by an interrupted kvconvert run (pid %d)", entry, pid)
            elif remove:
                who = f"pid {pid} is still running" if pid else "its process is unknown"
                log.warning("kvconvert: left %s alone (%s); delete it once no kvconvert writes %s", entry, who,
                            target)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
