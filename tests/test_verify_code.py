"""verify_code: model-written code runs only in the sandbox. Correct code scores α, wrong code 0,
and a fork bomb, an infinite loop, a network connection and a read of a host file all score 0
without harming the process that runs the tests. The sandbox's /tmp is writable, within limits."""

import os
import socket
import threading
import time

import pytest

from posttrain import UserError
from posttrain.plugins import verify_code
from posttrain.plugins.verify_code import VerifyCode, extract_code, sandbox_exit_status

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


@pytest.fixture(scope="module")
def plugin():
    return VerifyCode(VerifyCode.Options(alpha=10.0, timeout_seconds=3.0))


def score(plugin, completion, tests=TESTS):
    return plugin.posttrain_reward([completion], {"ground_truth": [tests]})[0]


def test_right_and_wrong_code(plugin):
    right = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    assert score(plugin, right) == 10.0
    assert score(plugin, wrong) == 0.0
    assert score(plugin, "def add(a, b): return a + b") == 10.0  # no fence: the whole text
    assert score(plugin, right, ["assert add(1, 1) == 2", "assert add(0, 0) == 0"]) == 10.0
    assert plugin.posttrain_reward([right], {}) is None  # no tests column: abstain
    assert plugin.posttrain_reward([right, right], {"ground_truth": [None, TESTS]}) == [None, 10.0]


def test_tests_in_another_column_and_only_if():
    plugin = VerifyCode(VerifyCode.Options(alpha=1.0, column="tests", only_if={"lang": ["python"]}))
    right = "def add(a, b):\n    return a + b"
    columns = {"tests": [TESTS, TESTS], "lang": ["python", "rust"]}
    assert plugin.posttrain_reward([right, right], columns) == [1.0, None]
    assert plugin.posttrain_reward([right], {"ground_truth": [TESTS]}) is None  # not its column


def test_extract_code_takes_the_last_block():
    text = "```python\nfirst = 1\n```\nthen\n```py\nsecond = 2\n```"
    assert extract_code(text).strip() == "second = 2"


def test_fork_bomb_scores_zero_and_leaves_nothing_behind(plugin):
    bomb = "```python\nimport os\nwhile True:\n    os.fork()\n```"
    started = time.monotonic()
    assert score(plugin, bomb) == 0.0
    assert time.monotonic() - started < 3.0 + 2.0
    time.sleep(0.5)
    nobody = [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) == 65534]
    assert nobody == []  # no sandboxed process survives


def _uid(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except OSError:
        return None


def test_infinite_loop_is_cut_at_the_time_limit(plugin):
    started = time.monotonic()
    assert score(plugin, "```python\nwhile True:\n    pass\n```") == 0.0
    assert 2.5 < time.monotonic() - started < 3.0 + 2.0


def test_no_network_even_to_the_hosts_loopback(plugin):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(3)
    port = listener.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')"

    def attempt(run):
        accepted = []
        thread = threading.Thread(target=lambda: _accept(listener, accepted))
        thread.start()
        result = run()
        thread.join()
        return result, accepted

    # control: outside the sandbox the same program reaches the listener
    _, accepted = attempt(lambda: exec(code, {}))
    assert accepted == [b"leak"]
    result, accepted = attempt(lambda: score(plugin, code, "pass"))
    listener.close()
    assert result == 0.0 and accepted == []


def _accept(listener, accepted):
    try:
        conn, _ = listener.accept()
        accepted.append(conn.recv(16))
        conn.close()
    except OSError:
        pass


def test_host_files_are_not_visible(plugin, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the answer is 42")
    read_it = f"print(open({str(secret)!r}).read())"
    assert score(plugin, read_it, "pass") == 0.0
    for path in ("/root/.bashrc", "/etc/passwd", os.getcwd() + "/pyproject.toml"):
        assert score(plugin, f"open({path!r}).read()", "pass") == 0.0
    assert score(plugin, "import os\nassert os.getuid() == 65534", "pass") == 10.0  # runs as nobody


def test_memory_hog_scores_zero(plugin):
    assert score(plugin, "x = bytearray(4 * 1024 ** 3)", "pass") == 0.0
    assert score(plugin, "open('/tmp/big', 'wb').write(b'0' * (64 * 1024 ** 2))", "pass") == 0.0


def test_hostile_text_completions(plugin):
    for text in ("", "x" * 1_000_000, b"\xff\xfe\xc3\x28".decode("utf-8", "surrogateescape"), "9**9**9**9"):
        assert score(plugin, text) == 0.0


TEMP_FILE_SOLUTION = """```python
import os
import tempfile


def add(a, b):
    # a roundabout but correct solution: it goes through a temporary file, and a file in /tmp
    with tempfile.NamedTemporaryFile("w+", suffix=".txt") as f:
        f.write(str(a + b))
        f.flush()
        f.seek(0)
        total = int(f.read())
    with open("/tmp/last.txt", "w") as f:
        f.write(str(total))
    assert os.path.getsize("/tmp/last.txt") > 0
    return total
```"""

WRITE = """import errno, sys
try:
    for i in range({files}):
        with open(f"/tmp/data{{i}}", "wb") as f:
            f.write(b"0" * ({megabytes} * 1024 ** 2))
except OSError as e:
    sys.exit({{errno.EFBIG: 42, errno.ENOSPC: 43, errno.EACCES: 44}}.get(e.errno, 45))
"""


def test_a_program_may_write_temporary_files(plugin):
    assert score(plugin, TEMP_FILE_SOLUTION) == 10.0
    assert sandbox_exit_status(WRITE.format(files=1, megabytes=4)) == 0  # 4 MB: within the limits


def test_writes_are_limited(plugin):
    # one 64 MB file: refused by the file-size limit (8 MB), not by permissions or a full /tmp
    assert sandbox_exit_status(WRITE.format(files=1, megabytes=64)) == 42
    # three 6 MB files, each under the file-size limit: the 16 MB /tmp is full
    assert sandbox_exit_status(WRITE.format(files=3, megabytes=6)) == 43
    # and each program starts with an empty /tmp
    assert sandbox_exit_status("import os\nassert os.listdir('/tmp') == []") == 0


def test_a_sandbox_that_cannot_run_is_refused_at_once(monkeypatch):
    """A bwrap that refuses the command line (too old for --perms/--size, say) would score every completion 0."""
    real = verify_code.sandbox_command
    monkeypatch.setattr(verify_code, "sandbox_command", lambda *a: [real(*a)[0], "--no-such-option", *real(*a)[1:]])
    with pytest.raises(UserError, match="sandbox cannot run a program here") as refused:
        VerifyCode(VerifyCode.Options())
    assert refused.value.field == "plugins.verify_code" and "bubblewrap 0.8" in refused.value.fix
