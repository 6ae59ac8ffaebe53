"""Code verifier: the completion's Python code passes the example's tests, run in a sandbox.

A reward source: α when the program (the last fenced code block of the completion, or the
whole completion when it has none) followed by the example's tests (a string of Python
statements, or a list of them, e.g. ``assert add(2, 3) == 5``) exits with status 0, else 0. The
tests are read from the ``column`` option's column (``ground_truth`` by default; ``column: tests``
for data that keeps them in a ``tests`` column). It abstains for examples without tests.

Model-written code runs only inside a bubblewrap sandbox:

- no network (its own network namespace: not even the host's loopback is reachable);
- no host files: only /usr, /lib and a read-only Python standard library are mounted, plus an
  empty 16 MB /tmp that the program may write (mode 1777, like a host's /tmp; it is also the
  working and home directory, and is discarded afterwards); the process runs as the
  unprivileged ``nobody`` user;
- limits: wall-clock time (the whole process tree is killed), address space, number of
  processes (a fork bomb stops there), file size (8 MB: a bigger write fails with EFBIG, "File
  too large"); output is discarded.

Programs run one at a time: the process limit counts every process of the ``nobody`` user, so a
fork bomb running beside a correct program would make that one fail too.

Needs the ``bwrap`` program (Debian/Ubuntu: ``apt-get install bubblewrap``; ``make setup``
installs it) and util-linux's ``setpriv`` and ``prlimit``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from posttrain import UserError
from posttrain.types import completion_text
from posttrain.verifier import Verifier

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
NOBODY = 65534
TMP_BYTES = 16 * 1024 * 1024  # size of the sandbox's /tmp
FILE_BYTES = 8 * 1024 * 1024  # largest file the program may write


def extract_code(text: str) -> str:
    """The last fenced code block, or the text itself."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def sandbox_command(timeout: float, memory_mb: int, max_processes: int) -> list[str]:
    """The bwrap command line that runs ``python3 -`` (the program on standard input)."""
    python_home = sys.base_prefix  # the interpreter's own installation: standard library only
    return [
        "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr", "--ro-bind", "/lib", "/lib", "--ro-bind-try", "/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin", "--ro-bind", python_home, "/python",
        "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
        "--chdir", "/tmp", "--clearenv", "--setenv", "HOME", "/tmp", "--setenv", "PATH", "/usr/bin",
        "--",
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
        "--bounding-set=-all",
        "prlimit", f"--nproc={max_processes}", f"--as={memory_mb * 1024 * 1024}",
        f"--fsize={FILE_BYTES}", f"--cpu={int(timeout) + 1}", "--",
        "/python/bin/python3", "-I", "-",
    ]


def sandbox_exit_status(program: str, *, timeout: float = 5.0, memory_mb: int = 512,
                        max_processes: int = 32) -> int | None:
    """The exit status of ``program`` run inside the sandbox (negative: killed by that signal), or
    None when it ran past ``timeout`` seconds."""
    try:
        proc = subprocess.run(sandbox_command(timeout, memory_mb, max_processes),
                              input=program.encode("utf-8", "replace"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None  # subprocess killed bwrap; --die-with-parent and the pid namespace take the rest
    return proc.returncode


def run_sandboxed(program: str, *, timeout: float = 5.0, memory_mb: int = 512, max_processes: int = 32) -> bool:
    """True when ``program`` exits with status 0 inside the sandbox within ``timeout`` seconds."""
    return sandbox_exit_status(program, timeout=timeout, memory_mb=memory_mb, max_processes=max_processes) == 0


def sandbox_problem(memory_mb: int = 512, max_processes: int = 32) -> str | None:
    """None when the sandbox runs a program that writes to /tmp, else what went wrong."""
    program = "import tempfile\nwith tempfile.TemporaryFile() as f:\n    f.write(b'ok')\n"
    try:
        proc = subprocess.run(sandbox_command(30.0, memory_mb, max_processes), input=program.encode(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if proc.returncode == 0:
        return None
    try:
        version = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        version = "bwrap of unknown version"
    detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    return f"{version}: exit status {proc.returncode}" + (f", {detail[-1][:300]}" if detail else "")


class VerifyCode(Verifier):
    name = "verify_code"
    description = "reward α when the completion's code passes the example's tests in a network-less sandbox"
    gold_kinds = ("text", "list")  # the tests: a program's text, or a list of assert lines

    @dataclass
    class Options(Verifier.Options):
        timeout_seconds: float = field(default=5.0, metadata={"help": "Wall-clock limit of one program."})
        memory_mb: int = field(default=512, metadata={"help": "Address-space limit of the program."})
        max_processes: int = field(default=32, metadata={"help": "Process limit (stops fork bombs)."})

        def validate(self):
            if self.timeout_seconds <= 0:
                raise ValueError("timeout_seconds must be > 0")
            if self.memory_mb < 64:
                raise ValueError("memory_mb must be at least 64")
            if self.max_processes < 1:
                raise ValueError("max_processes must be at least 1")

    def __init__(self, options=None):
        super().__init__(options)
        missing = [tool for tool in ("bwrap", "setpriv", "prlimit") if shutil.which(tool) is None]
        if missing:
            raise UserError(f"verify_code runs code only in a sandbox and needs {', '.join(missing)}",
                            field="plugins.verify_code",
                            fix="install bubblewrap and util-linux (apt-get install bubblewrap util-linux)")
        problem = sandbox_problem(self.options.memory_mb, self.options.max_processes)
        if problem:  # every program would fail: do not score every completion 0 in silence
            raise UserError(f"verify_code's sandbox cannot run a program here ({problem})",
                            field="plugins.verify_code",
                            fix="install bubblewrap 0.8 or newer, and run where it may create namespaces "
                                "(a container may need --privileged or user namespaces enabled)")

    def score(self, completion, tests):
        tests = "\n".join(map(str, tests)) if isinstance(tests, (list, tuple)) else str(tests)
        try:
            program = extract_code(completion_text(completion)) + "\n\n" + tests + "\n"
        except Exception:  # noqa: BLE001 - an object that cannot even be read scores 0
            return False
        return run_sandboxed(program, timeout=self.options.timeout_seconds, memory_mb=self.options.memory_mb,
                             max_processes=self.options.max_processes)
