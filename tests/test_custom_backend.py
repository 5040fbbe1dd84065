"""The custom command backend with real programs: request JSON on stdin, answer JSON on stdout."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backends.base import BackendError, DeadlineExceeded, Request
from backends.custom_command import CustomCommandBackend, CustomSettings


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def backend(command: list[str], **kw) -> CustomCommandBackend:
    return CustomCommandBackend.from_settings(CustomSettings(type="custom", command=command, name="mine", **kw))


def request(seconds: float = 20.0, schema=None) -> Request:
    return Request(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                   max_tokens=42, deadline=time.monotonic() + seconds, schema=schema, temperature=0.3)


ECHO = """
import json, sys
got = json.load(sys.stdin)
print(json.dumps({"text": json.dumps(got), "model": "echo-1", "prompt_tokens": 3, "completion_tokens": 5}))
"""


def test_the_request_goes_in_on_stdin_and_the_answer_comes_back(tmp_path):
    b = backend([str(script(tmp_path, "echo.py", ECHO))])
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    generation = b.generate(request(schema=schema))
    got = json.loads(generation.text)
    assert got["messages"][1] == {"role": "user", "content": "Hi"}
    assert got["schema"] == schema and got["max_tokens"] == 42 and got["temperature"] == 0.3
    assert 0 < got["seconds_left"] <= 25.0  # bounded by timeout_s (default 25) and the deadline
    assert (generation.model.mode, generation.model.name, generation.backend) == ("custom", "echo-1", "mine")
    assert (generation.prompt_tokens, generation.completion_tokens) == (3, 5)


def test_a_relative_command_is_found_from_cwd(tmp_path):
    script(tmp_path, "echo.py", ECHO)
    assert json.loads(backend(["./echo.py"], cwd=str(tmp_path)).generate(request()).text)["max_tokens"] == 42


@pytest.mark.parametrize("command, words", [
    (["no-such-program-storynet"], "not on PATH"),
    (["./missing.py"], "not an executable file"),
])
def test_a_missing_program_fails_at_start_naming_the_setting(tmp_path, command, words):
    with pytest.raises(BackendError, match=words) as e:
        backend(command, cwd=str(tmp_path))
    assert "backends command" in str(e.value)


@pytest.mark.parametrize("body, words", [
    ("import sys; sys.stderr.write('model exploded'); sys.exit(3)", "status 3: model exploded"),
    ("print('hello there')", "stdout is not JSON"),
    ("print('{\"content\": \"old protocol\"}')", 'a "text" string'),
    ("print('{\"text\": \"  \"}')", "empty answer"),
])
def test_a_failing_command_is_a_backend_error_that_says_why(tmp_path, body, words):
    b = backend([str(script(tmp_path, "bad.py", body))])
    with pytest.raises(BackendError, match=words):
        b.generate(request())
    assert not b.health().ok


@pytest.mark.slow
def test_a_command_past_its_time_is_killed_with_what_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    slow = script(tmp_path, "slow.py", f"""
        import subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """)
    b = backend([str(slow)], timeout_s=2.0)
    with pytest.raises(BackendError, match="did not answer within 2.0 s .*max_retries is 0"):
        b.generate(request(seconds=20.0))
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; give the kernel a moment (a zombie is dead too)
        try:
            if Path(f"/proc/{child}/stat").read_text().split(") ")[1].startswith("Z"):
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the command's child {child} outlived the timeout")


@pytest.mark.slow
def test_the_request_deadline_caps_the_command_timeout(tmp_path):
    b = backend([str(script(tmp_path, "slow.py", "import time; time.sleep(30)"))], timeout_s=60.0)
    with pytest.raises(DeadlineExceeded, match="deadline passed after 1 failed tries: the command did not answer"):
        b.generate(request(seconds=2.0))
    with pytest.raises(DeadlineExceeded, match="deadline passed$"):
        b.generate(request(seconds=0.5))


def test_health_runs_a_tiny_real_request(tmp_path):
    b = backend([str(script(tmp_path, "echo.py", ECHO))])
    health = b.health()
    assert health.ok and "answered" in health.detail


@pytest.mark.slow
def test_a_command_that_timed_out_runs_again_when_max_retries_allows(tmp_path):
    runs = tmp_path / "runs"
    flaky = script(tmp_path, "flaky.py", f"""
        import json, pathlib, sys, time
        runs = pathlib.Path({str(runs)!r})
        runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
        json.load(sys.stdin)
        if len(runs.read_text()) == 1:
            time.sleep(30)
        print(json.dumps({{"text": "second time lucky"}}))
    """)
    assert backend([str(flaky)], timeout_s=1.5, max_retries=1).generate(request()).text == "second time lucky"
    assert runs.read_text() == "xx"


ENV_DUMP = """
import json, os, sys
open(sys.argv[1], "w").write(json.dumps(dict(os.environ)))
sys.stderr.write(json.dumps(dict(os.environ)))
sys.exit(1)
"""


def test_the_command_gets_the_basics_and_what_pass_env_names_and_its_values_stay_out_of_errors(tmp_path, monkeypatch):
    token = "tok-for-my-service-8f3a61c2"
    monkeypatch.setenv("STORYNET_TEST_SERVICE_TOKEN", token)
    monkeypatch.setenv("STORYNET_TEST_UNLISTED", "not for the command")
    seen = tmp_path / "env.json"
    b = backend([str(script(tmp_path, "dump.py", ENV_DUMP)), str(seen)], pass_env=["STORYNET_TEST_SERVICE_TOKEN"])
    with pytest.raises(BackendError, match="status 1") as failed:
        b.generate(request())
    env = json.loads(seen.read_text())
    assert env["STORYNET_TEST_SERVICE_TOKEN"] == token and "STORYNET_TEST_UNLISTED" not in env
    assert set(env) - {"STORYNET_TEST_SERVICE_TOKEN"} <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE",
                                                        "TZ", "TMPDIR"} | {k for k in env if k.startswith("LC_")}
    assert token not in str(failed.value) and "<STORYNET_TEST_SERVICE_TOKEN: redacted>" in str(failed.value)


def test_a_pass_env_variable_that_is_not_set_fails_at_start_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("STORYNET_TEST_NOT_SET", raising=False)
    with pytest.raises(BackendError, match="STORYNET_TEST_NOT_SET .pass_env of backend mine. is not set"):
        backend([str(script(tmp_path, "echo.py", ECHO))], pass_env=["STORYNET_TEST_NOT_SET"])
    with pytest.raises(ValueError, match="(?s)pass_env.*not environment variable names: 'MY KEY'"):
        backend([str(script(tmp_path, "echo.py", ECHO))], pass_env=["MY KEY"])
