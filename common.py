"""The plumbing every entry point shares, at the bottom of the imports (no project module).

Files (every write atomic, every JSONL read naming its lines), the user-error type and the CLI
wrapper that turns it into exit 2, flags built from a dataclass, seed derivation, the process group
(setup, teardown, print0, all_sum, barrier), the one-run-per-output lock and signal handling.
"""
import contextlib
import fcntl
import gc
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import sys
import traceback
from dataclasses import fields

import torch
import torch.distributed as dist

# --- errors: bad input is a message and exit 2, never a traceback ---


class DataError(ValueError):
    """Bad input data; the message names FILE:LINE. The CLI prints it and exits 2."""


@contextlib.contextmanager
def user_errors(prog):
    """Bad input (files, flags, data) ends the program with one line `PROG: error: ...` and
    exit 2, no traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError, RecursionError) as e:  # DataError is a ValueError
        message = e
        if isinstance(e, KeyError) and e.args:
            message = e.args[0]
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


# --- files: atomic writes, JSON and JSONL ---


@contextlib.contextmanager
def atomic_path(path):
    """Yield a fresh temporary path beside `path`; write a file or a directory there, and on
    success it replaces `path` whole (a kill leaves the old or the new, never a mix)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    old = tmp + ".old"
    remove(tmp)
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):  # a directory cannot be renamed over
            os.rename(path, old)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: say what could not be written, and keep the old one
        if os.path.lexists(old) and not os.path.lexists(path):
            os.rename(old, path)
        why = e.strerror or e
        raise OSError(f"{path}: cannot write it ({why}); what was there before is intact") from e
    finally:
        remove(tmp)
        remove(old)


def remove(path):
    """Remove a file, a link or a directory tree; nothing if there is none."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def json_line(row):
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path, rows):
    write_text(path, "".join(json_line(r) for r in rows))


def append_jsonl(path, rows):
    """Append rows to a log (metrics, predictions), flushed: a kill tears at most the last line
    (read_jsonl's torn_tail); a failed write (disk full) raises OSError naming the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json_line(r) for r in rows)
    except OSError as e:
        raise OSError(f"{path}: cannot append to it ({e.strerror or e})") from e


def read_bytes(path):
    """A file's bytes; DataError names the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def read_text(path):
    """A file's UTF-8 text; DataError names the file, and the line of a non-UTF-8 byte."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def read_json(path, kind=dict):
    """A JSON file holding a `kind` (an object: a config, a summary; a list: a benchmark);
    unreadable or malformed, DataError names the file."""
    try:
        obj = json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, kind):
        what = "object" if kind is dict else kind.__name__
        raise DataError(f"{path}: not a JSON {what}")
    return obj


def jsonl_lines(path, torn_tail=False):
    """(line number, object or the JSON error's message) per non-blank line; with torn_tail the
    text after the last newline is left out (a writer was killed there, or is still writing)."""
    lines = read_bytes(path).split(b"\n")
    if torn_tail:
        lines = lines[:-1]
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
            if line.strip():
                yield lineno, json.loads(line)
        except UnicodeDecodeError as e:
            yield lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        except json.JSONDecodeError as e:
            yield lineno, f"bad JSON ({e.msg}, column {e.colno})"
        except RecursionError:
            yield lineno, "bad JSON (nested too deeply)"


def read_jsonl(path, torn_tail=False):
    """[(line number, object)] of a JSONL file; bad JSON raises DataError naming the line.
    torn_tail: a log that is appended to, whose unfinished last line is not yet a line."""
    rows = list(jsonl_lines(path, torn_tail))
    for lineno, row in rows:
        if isinstance(row, str):
            raise DataError(f"{path}:{lineno}: {row}")
    return rows


def check_outputs(outputs, inputs):
    """DataError when an output path is, or lies inside, an input path ([(flag, path)] each;
    empty paths are skipped), compared resolved, so neither a symlink nor a relative path hides
    it."""
    for flag, out in outputs:
        for in_flag, src in inputs:
            if not src:
                continue
            src_real = os.path.realpath(src)
            if os.path.commonpath([os.path.realpath(out), src_real]) == src_real:
                raise DataError(f"{flag} {out} would overwrite {in_flag} {src}: "
                                "write the outputs elsewhere")


# --- flags and seeds ---


def add_config_args(parser, cls):
    """One flag per field of the dataclass cls (`max_len` -> `--max-len`; a bool is a switch),
    default = the field's default, help = the comment after the field in cls's source."""
    notes = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    for f in fields(cls):
        note = notes.get(f.name, "").replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=note.strip())
            continue
        kind = f.type if isinstance(f.type, type) else type(f.default)
        note += " (default: %(default)r)"
        parser.add_argument(flag, type=kind, default=f.default, help=note.strip())


def config_from_args(cls, args):
    """cls built from the parsed flags of add_config_args (others in args are ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def flag_names(flag):
    """The names in a comma-separated flag (--teachers a,b; --thinking-words so,wait)."""
    return [n.strip() for n in flag.split(",") if n.strip()]


def derive_seed(*parts):
    """A 63-bit seed as a pure function of its parts (ints, strings): every random stream of a
    run is seeded so (dropout by seed, step, rank; data order by seed, epoch; S_MI's sample)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def duration(seconds):
    """12m05s, or 1h02m past an hour."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


# --- the process group ---
# The rule: every rank reaches every collective (barrier, all_sum, hold_lock, DDP fwd/bwd).


def setup_dist(device_type=None):
    """(rank, world_size, device) from torchrun's environment; a plain process is rank 0 of 1.
    device_type: "cuda" or "cpu" (default: cuda when there is one)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_type)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def cleanup_dist():
    """Destroy the process group, first freeing what the job's traceback (if any) holds: a DDP
    model that outlived the group into the interpreter's exit would destroy gloo's last reference
    with the GIL held, while gloo's worker waits for the GIL to free its last tensor: a deadlock."""
    if not dist.is_initialized():
        return
    e = sys.exc_info()[1]
    while e is not None:
        traceback.clear_frames(e.__traceback__)
        e = e.__context__
    gc.collect()  # a process's first DDP sits in a reference cycle
    dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only (every rank of a plain process), flushed."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_sum(x):
    """x summed over ranks, in place (a collective: every rank calls it)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def barrier():
    """dist.barrier() under torchrun (a collective: every rank calls it); nothing otherwise."""
    if dist.is_initialized():
        dist.barrier()


# --- one run per output, and signals ---


@contextlib.contextmanager
def hold_lock(out, rank, device, path=None):
    """One run per output: rank 0 holds an exclusive lock on the file `path` (OUT/train.lock)
    for the job (lock_file); when another process holds it, every rank raises DataError naming
    OUT and the holder's pid. A collective: every rank enters it."""
    with contextlib.ExitStack() as stack:
        holder = None
        if rank == 0:
            holder = lock_file(stack, path or os.path.join(out, "train.lock"))
        held = torch.tensor([float(holder is not None)], device=device)
        if all_sum(held).item():
            raise DataError(f"{out}: another run (pid {holder or '?'}) writes there; "
                            "wait for it to end, or choose another --out")
        yield


def lock_file(stack, path):
    """Take an exclusive flock on the file `path` for the ExitStack's life and write our pid in
    it: None, or the pid in it when another process holds it. The kernel drops a flock when its
    process dies, so a killed run leaves no stale lock."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = stack.enter_context(open(path, "a+", encoding="utf-8"))
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        return f.read().strip() or "?"
    f.truncate(0)
    print(os.getpid(), file=f, flush=True)
    return None


STOP = {}  # the first SIGTERM or SIGINT of a job (run_job): train() stops after that step


def note_signal(signum, frame):
    STOP.setdefault("signal", signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT ask train() to stop after the optimizer step under way, with a
    checkpoint. A second one is ignored (torchrun passes a terminal's Ctrl-C on to its workers
    once more); SIGKILL stops at once."""
    old = {s: signal.signal(s, note_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        STOP.clear()


def run_job(job, *args, prog="train.py"):
    """job(*args, rank, world, device) in torchrun's process group (or a plain process): bad input
    exits 2 with its message and no traceback (user_errors), a non-finite stop exits 1, SIGTERM or
    SIGINT (stop_on_signals) 128 + its number (143, 130)."""
    rank, world, device = setup_dist()
    try:
        with stop_on_signals(), user_errors(prog):
            return job(*args, rank, world, device)
    except FloatingPointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        cleanup_dist()

