"""Result files: atomic writes, checks that a path can take a file, JSONL appends under a lock with resume keys."""

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path


def _new_file_mode(path: Path) -> int:
    """The permission bits a (re)written ``path`` gets: the existing file's, else 0o666 less the umask."""
    if path.exists():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_stream(path: Path) -> bool:
    """Whether ``path`` (symlinks followed) is a device or a pipe, e.g. /dev/stdout: written, never replaced."""
    return path.exists() and not path.is_file() and not path.is_dir()


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: never half-written.

    A symlink is written through to its target; the file keeps its mode (a new one follows the umask).
    A device or pipe (``is_stream``) is simply written to."""
    if is_stream(Path(path)):
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(text)
        return Path(path)
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path, what: str) -> None:
    """Raise unless a file can be written at ``path`` (symlinks followed): not a folder, and either a
    writable file, device or pipe, or a name in a writable folder (folders still to be created count as
    their nearest existing one)."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder, not a file")
    if Path(path).exists():
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{what} {str(path)!r}: the file is not writable")
        return
    folder = Path(os.path.realpath(path)).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(path)!r}: the folder {folder} is not writable")


def check_appendable(path: str | Path, what: str) -> None:
    """``check_writable``, and a regular file (or a name for one): JSONL records are read back to resume, which a
    device or pipe (/dev/full, /dev/stdout) cannot do."""
    check_writable(path, what)
    if is_stream(Path(path)):
        raise ValueError(f"{what} {str(path)!r}: JSONL records are read back to resume, so they need a regular file")


def canonical(value) -> str:
    """``value`` as JSON with sorted keys: equal for equal values, tuples and lists alike."""
    return json.dumps(value, sort_keys=True)


def _cut_incomplete_tail(file) -> None:
    """Repair the end of a JSONL file: a last line without its newline is kept (newline added) if it is
    whole JSON, else it is what a writer killed mid-line left, and is cut off."""
    file.seek(0)
    data = file.read()
    keep = data.rfind(b"\n") + 1
    tail = data[keep:]
    if not tail:
        return
    try:
        json.loads(tail)
        os.write(file.fileno(), b"\n")
    except ValueError:
        file.truncate(keep)


@contextlib.contextmanager
def locked_jsonl(path: Path):
    """The JSONL file ``path`` opened for appending (created if absent, symlinks followed, the umask
    honoured) under an exclusive ``flock``, its incomplete last line cut off. POSIX only (Linux, macOS)."""
    import fcntl  # here, not at the top: the rest of fprobe imports on Windows too

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        _cut_incomplete_tail(file)
        yield file


def read_jsonl_locked(path: str | Path, what: str) -> list[tuple[str, object]]:
    """``read_json_lines`` of a JSONL file that other processes may be appending to (none if absent)."""
    path = Path(path)
    if not path.exists():
        return []
    with locked_jsonl(path):
        return list(read_json_lines(path, what))


def append_json_line(path: str | Path, record: dict, unique: str, what: str = "results file") -> bool:
    """Append ``record`` as one JSON line unless a record with the same ``record[unique]`` is already
    there; returns whether it was appended. Safe for concurrent writers: the check and the append happen
    under the file's lock (``locked_jsonl``), the line goes out in one ``write`` and is fsynced."""
    path = Path(path)
    key = canonical(record[unique])
    with locked_jsonl(path) as file:
        for _, existing in read_json_lines(path, what):
            if isinstance(existing, dict) and canonical(existing.get(unique)) == key:
                return False
        os.write(file.fileno(), (json.dumps(record) + "\n").encode("utf-8"))
        os.fsync(file.fileno())
    return True


def read_json_lines(path: Path, what: str):
    """(``"FILE:LINE"``, object) for each non-blank line of a JSONL file (a leading byte-order mark is
    skipped); a line that is not UTF-8 or not JSON raises ``ValueError`` naming ``what``, the file and
    the line number."""
    with Path(path).open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: the {what} is not UTF-8 text (byte {error.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: malformed JSON line in the {what}: {error.msg}") from None
