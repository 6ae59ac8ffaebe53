"""verify_code: model-written code runs only in the sandbox. Correct code scores α, wrong code 0,
and a fork bomb, an infinite loop, a network connection and a read of a host file all score 0
without harming the process that runs the tests."""

import os
import socket
import threading
import time

import pytest

from posttrain.plugins.verify_code import VerifyCode, extract_code

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


@pytest.fixture(scope="module")
def plugin():
    return VerifyCode(VerifyCode.Options(alpha=10.0, timeout_seconds=3.0))


def score(plugin, completion, tests=TESTS):
    return plugin.posttrain_reward([completion], {"tests": [tests]})[0]


def test_right_and_wrong_code(plugin):
    right = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    assert score(plugin, right) == 10.0
    assert score(plugin, wrong) == 0.0
    assert score(plugin, "def add(a, b): return a + b") == 10.0  # no fence: the whole text
    assert score(plugin, right, ["assert add(1, 1) == 2", "assert add(0, 0) == 0"]) == 10.0
    assert plugin.posttrain_reward([right], {}) is None  # no tests column: abstain


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
