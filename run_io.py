"""What every run does around its work: one-line errors, logging, the output-folder lock, staged outputs,
atomic JSON writes and path predicates (run_config.json itself is run_record.py's).
"""

import errno
import functools
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from contextlib import contextmanager
from urllib.parse import urlparse


def is_local(name: str) -> bool:
    """A local path (existing, or path-like) rather than a Hugging Face Hub id, which is "owner/name"."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's ~45 s of retries (once per endpoint and process: an
    offline run would wait `timeout` for each model it loads); UserError for an HF_ENDPOINT that is not an
    http(s) URL with a valid port."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return _endpoint_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


@functools.cache
def _endpoint_reachable(endpoint: str, timeout: float) -> bool:
    try:
        url = urlparse(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("not an http(s) URL with a host")
        address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False
    except ValueError as e:  # a port out of range or not a number, a host name IDNA cannot encode
        raise UserError(
            f"HF_ENDPOINT={endpoint!r} is not a valid URL ({e}); set it like https://huggingface.co or unset it"
        ) from None


def offline_hint(what: str, name: str, flag: str) -> str:
    return (
        f"{what} {name!r} is not a local folder, not in the Hugging Face cache, and the Hub is unreachable. "
        f"Pass {flag} /path/to/local/copy, or run with --demo to use the offline tiny model and synthetic data."
    )


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (some libraries start theirs with a newline)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def folder_model_type(folder: str):
    """The model_type in a model folder's config.json, or None where it has none or cannot be read."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def from_pretrained_kwargs(name: str, flag: str) -> dict:
    """from_pretrained's kwargs for a folder or Hub id: local_files_only when the Hub is unreachable, so that an
    offline load fails at once instead of retrying for ~45 s. A path-like name that is no folder is one line."""
    if os.path.isdir(name):
        return {}
    if is_local(name):
        raise UserError(f"model folder {name!r} does not exist; pass an existing folder to {flag} or a Hub id")
    return {} if hub_reachable() else {"local_files_only": True}


def load_baseline_model(name: str, default: str, what: str, flag: str, load):
    """`load(**kwargs)` of a baseline's Hub id or folder (kwargs: local_files_only when the Hub is unreachable).

    The default model that cannot be loaded offline is None with one warning (the baseline is skipped); any
    other failure is one UserError line.
    """
    kwargs = from_pretrained_kwargs(name, flag)
    try:
        return load(**kwargs)
    except OSError as e:
        first = first_line(e)[:150]
        if name == default:
            logging.getLogger(__name__).warning(
                "%s baseline skipped: %s cannot be loaded (%s). Pass %s /local/copy, or %s none to silence this",
                what,
                name,
                first,
                flag,
                flag,
            )
            return None
        if kwargs:
            raise UserError(offline_hint(what, name, flag)) from e
        raise UserError(
            f"cannot load the {what} {name!r} ({type(e).__name__}: {first}); pass a folder or Hub id, or {flag} none"
        ) from e
    except Exception as e:  # a config of another kind, corrupt weights: each library raises its own type
        first = first_line(e)[:150]
        raise UserError(
            f"cannot load the {what} {name!r} ({type(e).__name__}: {first}); download it again, or pass {flag} none"
        ) from e


# Disk and permission faults the user fixes outside the program: one line, not a traceback
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# What torch.save raises for them: a RuntimeError of its C++ writer, not an OSError (as seen on a full disk)
_TORCH_WRITE_FAILURE = re.compile(
    r"PytorchStreamWriter failed writing|file write failed|inline_container\.cc.*unexpected pos"
    r"|basic_ios::clear: iostream error|open file failed with strerror: (?:"
    + "|".join(re.escape(os.strerror(code)) for code in sorted(_ENVIRONMENT_ERRNOS))
    + ")"
)
# ... and safetensors' save_file: a SafetensorError that ends "(os error 28)"
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def _environment_fault(e: Exception):
    """'what went wrong' when `e` is a disk or permission fault of writing a file, else None (a bug: a traceback)."""
    if isinstance(e, OSError):
        if e.errno not in _ENVIRONMENT_ERRNOS:
            return None
        return os.strerror(e.errno) + (f" ({e.filename})" if e.filename else "")
    first = first_line(e)
    if isinstance(e, RuntimeError) and _TORCH_WRITE_FAILURE.search(first):
        return f"writing a file failed (torch: {first}); the disk may be full or the folder read-only"
    code = _OS_ERROR_CODE.search(first)
    if type(e).__name__ == "SafetensorError" and code and int(code.group(1)) in _ENVIRONMENT_ERRNOS:
        return f"writing a file failed (safetensors: {first})"
    return None


def check_output_dir(out: str, adapter: str = None) -> None:
    """UserError when --output_dir is a file, or is the adapter folder (whose files the outputs would overwrite)."""
    if os.path.isfile(out):
        raise UserError(f"--output_dir {out!r} is a file; pass a folder")
    if adapter is not None and same_path(out, adapter):
        raise UserError(
            f"--output_dir {out!r} is the adapter folder; its files would be overwritten: pass another folder"
        )


def setup_logging() -> None:
    """Every script's log lines: level, logger name, message, from INFO up (LOG_LEVEL=DEBUG shows more, such as
    the library exception behind a one-line error)."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=getattr(logging, level, logging.INFO))


def join_cpu_processes() -> None:
    """Under torchrun on CPUs, make the processes one (gloo) group; call before anything picks a device.

    TrainingArguments (which sets up its devices while parsing) and accelerate's PartialState form a
    group only when told they are on CPU; otherwise each process believes it is alone and does all the work.
    """
    import torch
    from accelerate import PartialState

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        PartialState(cpu=True)


def run_main(main) -> None:
    """Entry-point wrapper: a UserError (or a full disk, a read-only folder, also as torch.save's and safetensors'
    own errors) becomes one line on stderr, exit code 2; Ctrl+C one line and exit code 130, as a shell reports it.
    Any other exception is a bug and keeps its traceback."""
    try:
        main()
    except KeyboardInterrupt:
        # outputs are staged (staged_outputs) and runs resume, so an interruption leaves nothing half-written
        print("interrupted: the output folder keeps what was finished, nothing half-written", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        if e.__cause__ is not None:  # the library's own exception: kept for LOG_LEVEL=DEBUG, not shown as a traceback
            logging.getLogger(__name__).debug("the error below was caused by:", exc_info=e.__cause__)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        fault = _environment_fault(e)
        if fault is None:
            raise
        print(f"error: {fault}: free some space or pick a writable --output_dir", file=sys.stderr)
        sys.exit(2)


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def same_source(a, b) -> bool:
    """The same model or data set: the same name, or two existing paths to the same place."""
    return a == b or (
        isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b) and same_path(a, b)
    )


def inside(path: str, folder: str) -> bool:
    """True when `path` is `folder` or lies below it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


_HELD_LOCKS = set()  # descriptors of the lock files this process holds (exclusive_lock)


def _drop_held_locks_in_child():
    """In a forked child (a DataLoader worker): close the parent's lock files.

    A flock lock belongs to the open file, which fork shares: a worker that outlived its killed
    parent would hold the run's lock until it noticed, seconds later. The parent keeps its lock.
    """
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_locks_in_child)


def _lock_holder(fd: int) -> str:
    """'pid N' from a lock file its holder wrote, else 'another process' (one that has not written yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


def _describe(path: str) -> str:
    """What `path` is, for a refusal: 'a symbolic link to X', 'a folder', ..."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "not a plain file"
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)!r}"
    return "a folder" if stat.S_ISDIR(mode) else "a plain file" if stat.S_ISREG(mode) else "not a plain file"


def _open_plain_file(path: str, flags: int) -> int:
    """os.open of a plain file that is never followed: UserError for a symbolic link (to anything, or dangling),
    a folder, a pipe or a device. A link is not created, truncated or written through, wherever it points."""
    try:
        # O_NONBLOCK: opening a pipe left in the folder must not hang (plain files ignore it)
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # ELOOP: a link, which O_NOFOLLOW refuses
            raise
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd is not None:
        os.close(fd)
    raise UserError(f"{path} is {_describe(path)}, not a plain file; nothing was read or written through it: remove it")


@contextmanager
def exclusive_lock(path: str, busy):
    """Hold an exclusive flock on `path`, with this process's pid written in it, for the block.

    The kernel releases it when the process ends, even killed, so a stale lock never blocks, and
    forked children do not hold it. When another process holds it, `busy(holder)` is called with
    'pid N': it raises to refuse, or returns to wait for the lock. A `path` that is not a plain file
    of its own (a symbolic link, a folder, a second name of another file) is refused with a UserError:
    writing the pid through it would change a file elsewhere.
    """
    import fcntl

    fd = _open_plain_file(path, os.O_RDWR | os.O_CREAT)
    if os.fstat(fd).st_nlink != 1:
        os.close(fd)
        raise UserError(
            f"{path} is a second name (hard link) of another file, which the lock would overwrite: remove it"
        )
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy(_lock_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


@contextmanager
def locked_output_dir(out: str):
    """Hold an exclusive lock on an output folder for a whole run: a second writer gets one line, not a mix.

    The lock is out/.lock (exclusive_lock). Under the lock, a save that was killed while moving its
    files into place is completed (staged_outputs), and `.saving-*` folders left by a killed save are removed
    (one that is a symbolic link: the link only, never what it points at).
    """
    check_output_dir(out)
    os.makedirs(out, exist_ok=True)

    def refuse(holder):
        raise UserError(f"another run is writing to {out!r} ({holder}); wait for it or pass another --output_dir")

    with exclusive_lock(os.path.join(out, ".lock"), refuse):
        _finish_move(out)
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if name.startswith(".saving-") and stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, ignore_errors=True)  # removes links inside it, never follows them
            elif name.startswith(".saving-"):
                os.remove(path)
        yield out


# A save's file names, so that the next save removes what it no longer writes (a rerun with fewer figures)
OUTPUT_SET = ".output_set.json"
# Present while a save moves its files into place: a folder holding it is a mix of two runs until _finish_move
MOVING = ".moving.json"


@contextmanager
def staged_outputs(out: str, last: tuple = ()):
    """Yield a temporary folder inside `out`; when the block succeeds, its files replace the previous set in `out`.

    The folder holds one run's complete set of files, never a mix. A full disk or a kill while
    writing leaves the previous set untouched (and a `.saving-*` folder that the next locked run
    removes). Moving the files in is one rename each, so first the plan (the new names, the old
    ones to remove) is written to out/.moving.json; a kill while moving leaves it, and whatever
    next opens the folder as a writer (locked_output_dir) completes the move before writing
    anything (readers refuse such a folder: run_record.AdapterRun.read): the folder is then all
    new. Files named in `last` move last. Other files in `out` (checkpoints, the lock) are not part
    of the set and stay.
    """
    _finish_move(out)
    tmp = tempfile.mkdtemp(prefix=".saving-", dir=out)
    try:
        yield tmp
        names = sorted(os.listdir(tmp), key=lambda n: n in last)
        stale = [n for n in _read_names(os.path.join(out, OUTPUT_SET)) if n not in names]
        write_json_atomic(os.path.join(out, MOVING), {"staging": os.path.basename(tmp), "files": names, "stale": stale})
        _finish_move(out)
    finally:
        if not os.path.exists(os.path.join(out, MOVING)):  # an interrupted move keeps its files for _finish_move
            shutil.rmtree(tmp, ignore_errors=True)


def _finish_move(out: str) -> None:
    """Carry out out/.moving.json, if a save left one: every staged file moved in, the stale ones removed.

    The plan and the staging folder may come from someone else (a folder handed over): everything is
    checked before anything is moved (_check_entry), and a UserError leaves the folder as it was.
    """
    path = os.path.join(out, MOVING)
    try:
        fd = _open_plain_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        with os.fdopen(fd) as f:
            plan = json.load(f)
        staging = os.path.join(out, _plain_name(plan["staging"], ".saving-"))
        files, stale = [_plain_name(n) for n in plan["files"]], [_plain_name(n) for n in plan["stale"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} (left by a save that was stopped) cannot be read ({type(e).__name__}: {e}); "
            f"the files in {out!r} may come from two runs: delete it and run again"
        ) from None
    # before anything moves: a refusal leaves the folder as it was
    _check_entry(staging, out, f"remove {path} and {staging} (if a link, only the link) and run again", staged=True)
    for name in files + stale:
        target = os.path.join(out, name)
        _check_entry(target, out, f"remove {target} (if a link, only the link) and run again: that finishes the save")
    for name in files:
        source, target = os.path.join(staging, name), os.path.join(out, name)
        if not os.path.lexists(source):  # moved before the interruption
            continue
        if os.path.isdir(target):  # not a link: _check_entry refused those
            shutil.rmtree(target)
        os.replace(source, target)
    for name in stale:
        target = os.path.join(out, name)
        if os.path.isdir(target):  # not a link: _check_entry refused those
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
    write_json_atomic(os.path.join(out, OUTPUT_SET), files)
    os.remove(path)
    shutil.rmtree(staging, ignore_errors=True)


def _check_entry(path: str, out: str, advice: str, staged: bool = False) -> None:
    """UserError (ending in `advice`) unless `path` is absent, or a plain file or a real folder in `out` (with
    `staged`: and so is everything in it).

    A save makes only plain files and folders, so a symbolic link among what it moves, replaces or removes
    was put there by someone else: it is refused wherever it points (its target can change after any
    check), as are pipes and devices. Nothing outside `out` is ever moved or removed.
    """
    if not os.path.lexists(path):
        return
    paths = [path]
    if staged and stat.S_ISDIR(os.lstat(path).st_mode):  # os.walk does not descend into links
        paths += [os.path.join(root, n) for root, dirs, names in os.walk(path) for n in dirs + names]
    for p in paths:
        mode = os.lstat(p).st_mode
        what = None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else _describe(p)
        what = what or (None if inside(p, out) else f"outside {out!r}")
        if what:
            raise UserError(
                f"a save that was stopped in {out!r} would move, replace or remove {p}, which is {what}; "
                f"no save makes that, so nothing was moved: {advice}"
            )


def _plain_name(name, prefix: str = "") -> str:
    """`name` if it is a file name in the folder itself (the plan is a file someone could edit), else ValueError."""
    if (
        not isinstance(name, str)
        or os.path.basename(name) != name
        or name in ("", ".", "..")
        or not name.startswith(prefix)
    ):
        raise ValueError(f"{name!r} is not a plain file name")
    return name


def _read_names(path: str) -> list:
    """The names in an OUTPUT_SET file; [] when there is none, it cannot be read or is not a plain file (a link is
    not followed): then nothing is removed."""
    try:
        with os.fdopen(_open_plain_file(path, os.O_RDONLY)) as f:
            return [_plain_name(n) for n in json.load(f)]
    except (OSError, ValueError, TypeError, UserError):
        return []


@contextmanager
def atomic_path(path: str, prefix: str = ".saving-", suffix: str = ".tmp"):
    """A temporary path in `path`'s folder to write a file to; renamed to `path` when the block ends, removed when
    it fails: the file is there complete or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from a group that shares the folder
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, value, prefix: str = ".saving-", suffix: str = ".json", indent=None) -> None:
    """Write JSON complete or not at all (atomic_path)."""
    with atomic_path(path, prefix, suffix) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=indent, default=str)


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file complete or not at all (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


class UserError(Exception):
    """A problem the user can fix; entry scripts print it as one line and exit 2."""
