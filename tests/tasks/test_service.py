"""The process controller, end to end on real processes (the demo service included)."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

import pytest

from tasks.probes import ProbeKind, probe, wait_until_ready
from tasks.service import ProcessController, ProcessControllerConfig, ServiceError
from tests.conftest import free_port


def controller(tmp_path, command: list[str], grace: float = 10) -> ProcessController:
    return ProcessController("api", ProcessControllerConfig(
        command=command, pid_file=tmp_path / "api.pid", log_file=tmp_path / "api.log", grace_seconds=grace))


def test_start_stop_restart_the_demo_service(tmp_path, sample_db):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ctl = controller(tmp_path, [sys.executable, "-m", "demo.service", "--dsn", sample_db, "--port", str(port),
                          "--redis", "none"])
    first = ctl.start()
    try:
        assert first.running and first.replicas == 1
        assert ctl.start().pid == first.pid  # idempotent
        assert wait_until_ready(url, deadline_seconds=20, interval=0.2).ok
        again = ctl.restart()
        assert again.running and again.pid != first.pid
        assert wait_until_ready(url, deadline_seconds=20, interval=0.2).ok
    finally:
        stopped = ctl.stop()
    assert not stopped.running and not (tmp_path / "api.pid").exists()
    assert not probe(url, ProbeKind.LIVE, timeout=0.5).ok
    assert ctl.stop().running is False  # idempotent


def test_sigkill_after_the_grace_period(tmp_path):
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                      "print('ignoring SIGTERM', flush=True); time.sleep(60)"]
    ctl = controller(tmp_path, stubborn, grace=0.5)
    assert ctl.start().running
    assert not ctl.stop().running


def test_a_service_that_crashes_on_start_shows_its_log(tmp_path):
    ctl = controller(tmp_path, [sys.executable, "-c",
                                "import sys, time; time.sleep(0.3); print('boom: no config'); sys.exit(3)"])
    assert ctl.start().running
    for _ in range(100):
        if not ctl.status().running:
            break
        time.sleep(0.05)
    assert not ctl.status().running
    assert ctl.logs() == ["boom: no config"]


def test_logs_since_a_start_are_that_starts_output(tmp_path):
    from datetime import timedelta

    def start(code: str, seen: str) -> ProcessController:
        ctl = controller(tmp_path, [sys.executable, "-c", f"import sys, time; {code}; sys.stdout.flush(); time.sleep(30)"])
        ctl.start()
        for _ in range(100):
            if any(seen in line for line in ctl.logs(5)):
                return ctl
            time.sleep(0.05)
        raise AssertionError(f"{seen!r} never logged")

    start("print('ERROR in the old one'); print('last words, no newline', end='')", "last words").stop()
    between = datetime.now(timezone.utc)
    ctl = start("print('second run')", "second run")
    try:
        assert ctl.logs() == ["ERROR in the old one", "last words, no newlinesecond run"]  # the file as it is
        assert ctl.logs(since=between) == ["second run"]  # from where this start's output begins
        assert ctl.logs(since=datetime.now(timezone.utc) + timedelta(seconds=1)) == []  # no start since
        (tmp_path / "api.log").unlink()
        with pytest.raises(ServiceError, match=r"service 'api': cannot read .*api.log: No such file"):
            ctl.logs(since=between)
        assert ctl.logs() == []  # without since, logs are evidence only
    finally:
        ctl.stop()
    assert ctl.logs(since=between) == []  # stopped: no instance to speak of


def test_missing_binary_and_bad_scale(tmp_path):
    with pytest.raises(ServiceError, match=r"service 'api': cannot start /nonexistent/bin"):
        controller(tmp_path, ["/nonexistent/bin"]).start()
    with pytest.raises(ServiceError, match="runs 0 or 1 instance, not 3"):
        controller(tmp_path, ["true"]).scale(3)


def stub_tools(tmp_path, monkeypatch, replies: dict[str, str | dict[str, str]], fail: str | None = None):
    """Stub commands on PATH that record their argv and print a canned reply: one per
    tool, or one per word its arguments contain ("*": any other)."""
    bin_dir = tmp_path / "stubs"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for tool, reply in replies.items():
        script = bin_dir / tool
        code = 'echo "unit not found" >&2; exit 5' if tool == fail else "exit 0"
        cases = reply if isinstance(reply, dict) else {"*": reply}
        printf = "".join(f"  {'*' if word == '*' else f'*{word}*'}) printf '{out}';;\n" for word, out in cases.items())
        script.write_text(f"""#!/bin/sh\necho "{tool} $*" >> "{calls}"\ncase "$*" in\n{printf}esac\n{code}\n""")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return lambda: calls.read_text().splitlines() if calls.exists() else []


def test_systemd_commands(tmp_path, monkeypatch):
    from tasks.service import SystemdController, SystemdControllerConfig

    calls = stub_tools(tmp_path, monkeypatch, {
        "systemctl": {"InvocationID": "5e1f0c2b9a\\n", "*": "ActiveState=active\\nSubState=running\\nMainPID=4242\\n"},
        "journalctl": "started\\nlistening on :8000\\n"})
    ctl = SystemdController("api", SystemdControllerConfig(unit="fraiseql.service"))
    status = ctl.restart()
    assert status.running and status.pid == 4242 and status.detail == "active (running)"
    assert ctl.logs(50) == ["started", "listening on :8000"]
    ctl.logs(1000, since=datetime(2026, 11, 30, 4, 50, 1, 500000, tzinfo=timezone.utc))
    ctl.scale(0)
    assert calls() == [
        "systemctl restart fraiseql.service",
        "systemctl show fraiseql.service --property=ActiveState,SubState,MainPID",
        "journalctl -u fraiseql.service -n 50 --no-pager -o cat",
        "systemctl show fraiseql.service --property=InvocationID --value",
        "journalctl _SYSTEMD_INVOCATION_ID=5e1f0c2b9a --since=@1796014201 -n 1000 --no-pager -o cat",
        "systemctl stop fraiseql.service",
        "systemctl show fraiseql.service --property=ActiveState,SubState,MainPID",
    ]


def test_docker_commands(tmp_path, monkeypatch):
    from tasks.service import DockerController, DockerControllerConfig

    calls = stub_tools(tmp_path, monkeypatch, {"docker": {"StartedAt": "2026-11-30T04:50:03.250000001Z",
                                                          "*": "true 777 running"}})
    ctl = DockerController("api", DockerControllerConfig(container="fraiseql-api", grace_seconds=20))
    assert ctl.restart().pid == 777
    ctl.logs(1000, since=datetime(2026, 11, 30, 4, 50, 1, 500000, tzinfo=timezone.utc))
    ctl.stop()
    assert calls() == [
        "docker restart --time 20 fraiseql-api",
        "docker inspect --format {{.State.Running}} {{.State.Pid}} {{.State.Status}} fraiseql-api",
        "docker inspect --format {{.State.StartedAt}} fraiseql-api",  # later than since: from there
        "docker logs --tail 1000 --since 1796014203.250000 fraiseql-api",
        "docker stop --time 20 fraiseql-api",
        "docker inspect --format {{.State.Running}} {{.State.Pid}} {{.State.Status}} fraiseql-api",
    ]


def test_missing_or_failing_tools_name_the_service(tmp_path, monkeypatch):
    from tasks.service import DockerController, DockerControllerConfig, SystemdController, SystemdControllerConfig

    calls = stub_tools(tmp_path, monkeypatch, {"systemctl": ""}, fail="systemctl")
    with pytest.raises(ServiceError, match=r"service 'api': systemctl restart x.service failed \(exit 5\): "
                                           r"unit not found"):
        SystemdController("api", SystemdControllerConfig(unit="x.service")).restart()
    assert calls() == ["systemctl restart x.service"]  # nothing after the failure
    with pytest.raises(ServiceError, match="service 'api': docker not found on this machine"):
        DockerController("api", DockerControllerConfig(container="c")).restart()
