"""One command's runner: it outlives the daemon and leaves the result on disk.

The runner server (:func:`serve`, started by the daemon, see
:class:`himbeere.launcher.Launcher`) forks one for each command, in a
session of its own; or by hand::

    python -I -S runner.py DIR LOCK_FD TIMEOUT LIMIT CMD [ARG ...]

It starts ``CMD`` in a process group of its own, keeps the first ``LIMIT``
bytes of its stdout and stderr in ``DIR/stdout`` and ``DIR/stderr`` (and
counts the rest), kills the group at ``TIMEOUT`` seconds, and finally
writes ``DIR/exit.json`` (atomically, by rename)::

    {"returncode": 0, "started": 1714564800.1, "finished": 1714564800.2,
     "duration": 0.004, "ending": null, "dropped": [0, 0], "error": null,
     "timeout": 30.0}

``ending`` is null, ``"timeout"`` or ``"interrupted"`` (the daemon asked it,
with SIGTERM, to stop the command); ``error`` says why ``CMD`` could not
start (``returncode`` is then null).  While it runs it holds an exclusive
``flock`` on ``DIR/lock`` (taken before it started, passed on as
``LOCK_FD``) and its pid is in ``DIR/pid``: a daemon started after a crash
tells a runner still at work (the lock is held) from one that died, for
example in a power cut (no lock, no ``exit.json``).

Why a process of its own: a command must not depend on the daemon's life.
If the daemon is killed (``kill -9``, the OOM killer), the runner goes on,
keeps the deadline and records the result; the next daemon writes it back.

It imports nothing but built-in modules, and the server runs with ``-I -S``
(no site packages): forking it costs about a millisecond, and it starts the
command with ``posix_spawnp`` (vfork): it is on the way of every command.
"""

# The C module: ``signal`` imports ``enum``, which would double the start-up time.
import _signal as signal  # type: ignore[import-not-found]
import os
import select
import sys
import time

#: Longest wait in one step (the deadline is checked after each).
SLICE = 1.0
#: Seconds to wait for a SIGKILLed group's leader to be reaped.
KILL_WAIT = 5.0


def _number(value: object) -> str:
    return "null" if value is None else repr(value)


def _text(value: "str | None") -> str:
    if value is None:
        return "null"
    escaped = "".join(c if " " <= c < "\x7f" and c not in '"\\' else f"\\u{ord(c):04x}"
                      for c in value)
    return '"' + escaped + '"'


def write_exit(directory: str, fields: dict) -> None:
    """``exit.json``, written to a temporary name and renamed: whole or absent."""
    parts = []
    for name, value in fields.items():
        if isinstance(value, list):
            text = "[" + ", ".join(_number(v) for v in value) + "]"
        elif isinstance(value, str) or value is None and name in ("ending", "error"):
            text = _text(value)
        else:
            text = _number(value)
        parts.append(f'"{name}": {text}')
    tmp = os.path.join(directory, "exit.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, ("{" + ", ".join(parts) + "}\n").encode())
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, "exit.json"))


def start(cmd: list, out: int, err: int) -> int:
    """Start ``cmd`` in a new session; return its pid, or raise OSError.

    ``posix_spawnp`` (vfork and exec): forking this process instead would
    copy every page Python touches before the exec.
    """
    defaults = [getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ", "SIGCHLD")
                if hasattr(signal, name)]  # as subprocess restores them
    return os.posix_spawnp(
        cmd[0], cmd, dict(os.environ),
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                      (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, err, 2)],
        setsid=True, setsigdef=defaults,
    )


def main(argv: list) -> int:
    directory, lock, cmd = argv[1], int(argv[2]), argv[5:]
    timeout, limit = float(argv[3]), int(argv[4])
    # The runner server took the lock on DIR/lock before it forked this
    # process (or whoever started it by hand passed it on): it is held from
    # before this process existed until it ends.  The command must not
    # inherit it, or a background child of the command would hold it on.
    os.set_inheritable(lock, False)
    pid_file = os.open(os.path.join(directory, "pid"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                       0o600)
    os.write(pid_file, str(os.getpid()).encode())
    os.close(pid_file)

    # SIGTERM from the daemon: stop the command.  The handler only writes to
    # the wake-up pipe, which the loop below watches.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    started_at, started = time.monotonic(), time.time()
    deadline = started_at + timeout
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = start(cmd, out_w, err_w)
    except OSError as exc:
        if exc.errno == 2:
            error = f"cmd: no such program: {cmd[0]!r}"
        else:
            error = f"cmd: cannot run {cmd[0]!r}: {exc.strerror or exc}"
        write_exit(directory, {"returncode": None, "started": started, "finished": time.time(),
                               "duration": round(time.monotonic() - started_at, 6),
                               "ending": None, "dropped": [0, 0], "error": error,
                               "timeout": timeout})
        return 0
    os.close(out_w)
    os.close(err_w)

    files = {out_r: os.open(os.path.join(directory, "stdout"), os.O_WRONLY | os.O_CREAT, 0o600),
             err_r: os.open(os.path.join(directory, "stderr"), os.O_WRONLY | os.O_CREAT, 0o600)}
    kept = {out_r: 0, err_r: 0}
    dropped = {out_r: 0, err_r: 0}
    try:
        exited = os.pidfd_open(pid)
    except (AttributeError, OSError):
        exited = None
    returncode = None
    ending = None
    watched = [out_r, err_r, wake_r] + ([exited] if exited is not None else [])
    while out_r in watched or err_r in watched or returncode is None:
        now = time.monotonic()
        if now >= deadline:
            ending = "timeout"
            break
        wait = min(SLICE, deadline - now) if exited is not None else min(0.05, deadline - now)
        poller = select.poll()  # not select(): safe for fd >= 1024
        for fd in watched:
            poller.register(fd, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(wait * 1000)]
        for fd in ready:
            if fd == wake_r:
                os.read(wake_r, 512)
                ending = "interrupted"
            elif fd == exited:
                watched.remove(exited)
            else:
                chunk = os.read(fd, 65536)
                if not chunk:
                    watched.remove(fd)
                    continue
                room = max(0, limit - kept[fd])
                if room:
                    os.write(files[fd], chunk[:room])
                    kept[fd] += min(room, len(chunk))
                dropped[fd] += len(chunk) - min(room, len(chunk))
        if ending:
            break
        if returncode is None and (exited is None or exited not in watched):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                returncode = os.waitstatus_to_exitcode(status)
    if ending:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if returncode is None:
        give_up = time.monotonic() + KILL_WAIT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() >= give_up:
                break
            time.sleep(0.01)
    write_exit(directory, {"returncode": returncode, "started": started,
                           "finished": time.time(),
                           "duration": round(time.monotonic() - started_at, 6),
                           "ending": ending, "dropped": [dropped[out_r], dropped[err_r]],
                           "error": None, "timeout": timeout})
    return 0


def serve(argv: list) -> int:
    """Start runners on request, warm: fork this process instead of a new interpreter.

    A request is one JSON line on stdin, ``[DIR, TIMEOUT, LIMIT, CMD]``; the
    answer is the runner's pid on a line of its own on stdout.  Each runner
    is forked holding the lock on ``DIR/lock``, in a session of its own, and
    outlives this server.  It ends at EOF on stdin (the daemon ended) or
    after ``argv[1]`` seconds without a request (the daemon starts it again).
    """
    import fcntl
    import json

    idle = float(argv[1])
    # Runners report through their directory: nobody here waits for them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    pending = b""
    while True:
        while b"\n" not in pending:
            poller = select.poll()  # not select(): safe for fd >= 1024
            poller.register(0, select.POLLIN)
            if not poller.poll(idle * 1000):
                return 0
            chunk = os.read(0, 65536)
            if not chunk:
                return 0
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        directory, timeout, limit, cmd = json.loads(line)
        lock = os.open(os.path.join(directory, "lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # held from before the runner exists
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the runner waits for its command
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                errors = os.open(os.path.join(directory, "runner.log"),
                                 os.O_WRONLY | os.O_CREAT, 0o600)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.dup2(errors, 2)
                os.close(null)
                os.close(errors)
                code = main(["runner", directory, str(lock), repr(float(timeout)), str(limit),
                             *cmd])
            except BaseException as exc:
                os.write(2, f"runner failed: {exc!r}\n".encode())
            finally:
                os._exit(code)
        os.close(lock)
        os.write(1, f"{pid}\n".encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
