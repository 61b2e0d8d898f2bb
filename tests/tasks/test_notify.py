"""tasks.notify against a real HTTP stand-in of the Slack Web API (no mocks of slack_sdk).

The stand-in is a ThreadingHTTPServer on 127.0.0.1 that records every request
(path, headers, parsed body) and answers like Slack, or fails on demand.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from typing import Any

import pytest
from pydantic import ValidationError

from tasks.notify import Notification, NotifySettings, Severity, send

from tests.slack_standin import SlackStandIn


@pytest.fixture
def token() -> str:
    return "xoxb-test-" + secrets.token_hex(12)


def _settings(url: str, token: str | None, **kw: Any) -> NotifySettings:
    return NotifySettings(slack_token=token, slack_channel="#restore-tests", slack_api_url=url, **kw)


def _note(**kw: Any) -> Notification:
    base: dict[str, Any] = {
        "title": "Restore test failed: orders",
        "text": "restored row count 1187 < 1200 expected",
        "severity": Severity.HIGH,
        "fields": {"rows_expected": 1200, "rows_restored": "1187"},
        "run_url": "http://prefect.local/runs/flow-run/abc?x=1&y=2",
    }
    return Notification(**(base | kw))


def _field_sections(blocks: list[dict[str, Any]]) -> list[list[str]]:
    return [[f["text"] for f in b["fields"]] for b in blocks
            if b["type"] == "section" and "fields" in b]


# ----------------------------------------------------------------------------- Slack


def test_posts_exact_request(slack: SlackStandIn, token: str,
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    assert send(_settings(slack.url, token), _note()) == ["console", "slack"]

    assert len(slack.requests) == 1
    req = slack.requests[0]
    assert req["path"] == "/api/chat.postMessage"
    assert req["headers"]["Authorization"] == f"Bearer {token}"
    body = req["body"]
    assert body["channel"] == "#restore-tests"
    assert "HIGH" in body["text"] and "Restore test failed: orders" in body["text"]

    blocks = body["blocks"]
    assert blocks[0]["type"] == "header"
    assert blocks[0]["text"]["type"] == "plain_text"
    assert blocks[0]["text"]["text"] == ":red_circle: Restore test failed: orders"
    text_sections = [b for b in blocks if b["type"] == "section" and "text" in b]
    assert text_sections == [{"type": "section", "text": {
        "type": "mrkdwn", "text": "restored row count 1187 &lt; 1200 expected"}}]
    assert _field_sections(blocks) == [["*rows_expected*\n1200", "*rows_restored*\n1187"]]
    assert all(f["type"] == "mrkdwn" for b in blocks if "fields" in b for f in b["fields"])
    context = blocks[-1]
    assert context["type"] == "context"
    texts = [e["text"] for e in context["elements"]]
    assert "Severity: *HIGH*" in texts
    assert "<http://prefect.local/runs/flow-run/abc?x=1&amp;y=2|Open the flow run>" in texts
    assert token not in caplog.text


def test_api_url_without_trailing_slash_still_hits_api_path(slack: SlackStandIn,
                                                            token: str) -> None:
    settings = _settings(slack.url.rstrip("/"), token)
    assert settings.slack_api_url == slack.url

    assert send(settings, _note(run_url=None)) == ["console", "slack"]

    assert [r["path"] for r in slack.requests] == ["/api/chat.postMessage"]
    blocks = slack.requests[0]["body"]["blocks"]
    assert all("Open the flow run" not in json.dumps(b) for b in blocks)


def test_more_than_ten_fields_are_split_into_sections(slack: SlackStandIn, token: str) -> None:
    fields = {f"check_{i:02d}": f"value {i}" for i in range(23)}

    assert send(_settings(slack.url, token), _note(fields=fields)) == ["console", "slack"]

    sections = _field_sections(slack.requests[0]["body"]["blocks"])
    assert [len(s) for s in sections] == [10, 10, 3]
    assert [t for s in sections for t in s] == [f"*{k}*\n{v}" for k, v in fields.items()]


# ----------------------------------------------------------------------------- console


def test_console_only_without_token(slack: SlackStandIn,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    note = _note(severity=Severity.MEDIUM, fields={"age_hours": "31", "max_age_hours": "26"})

    assert send(_settings(slack.url, None), note) == ["console"]

    assert slack.requests == []
    records = [r for r in caplog.records if r.name == "runbooks.notify"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    lines = records[0].getMessage().splitlines()
    assert lines[0] == ("[MEDIUM] Restore test failed: orders — "
                        "restored row count 1187 < 1200 expected")
    assert lines[1:] == [
        "  age_hours     : 31",
        "  max_age_hours : 26",
        "  run: http://prefect.local/runs/flow-run/abc?x=1&y=2",
    ]


def test_console_off_and_no_token_sends_nothing(slack: SlackStandIn,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert send(_settings(slack.url, None, console=False), _note()) == []
    assert slack.requests == []
    assert not [r for r in caplog.records if r.name == "runbooks.notify"]


# ----------------------------------------------------------------------------- failures


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/"


@pytest.mark.parametrize(
    ("mode", "expected_requests", "reason"),
    [
        ("ok_false", 1, "error='channel_not_found'"),
        ("http_500", 1, "HTTP 500"),
        ("down", 0, "Connection refused"),
        ("timeout", 1, "timed out"),
    ],
)
def test_slack_failure_never_breaks_the_runbook(
    slack: SlackStandIn, token: str, caplog: pytest.LogCaptureFixture,
    mode: str, expected_requests: int, reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = slack.url
    timeout = 5.0
    if mode == "ok_false":
        slack.reply = {"ok": False, "error": "channel_not_found"}
    elif mode == "http_500":
        slack.status, slack.reply = 500, "Internal Server Error"
    elif mode == "down":
        url = _closed_port_url()
    elif mode == "timeout":
        slack.hang, timeout = True, 0.3

    started = time.monotonic()
    result = send(_settings(url, token, timeout_seconds=timeout), _note(severity=Severity.LOW))
    elapsed = time.monotonic() - started

    assert result == ["console"]
    assert len(slack.requests) == expected_requests
    assert elapsed < 4, f"send took {elapsed:.1f}s"
    # Exactly one warning-or-worse line in the whole log: ours, one line, no traceback.
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    warning = loud[0]
    assert warning.name == "runbooks.notify"
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "\n" not in message
    assert message.startswith("Slack notification to #restore-tests not delivered")
    assert reason in message
    assert warning.exc_info is None and warning.exc_text is None
    assert token not in caplog.text
    assert token not in message


# ----------------------------------------------------------------------------- config / API


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError) as info:
        NotifySettings.model_validate({"slack_tokn": "xoxb-typo"})
    assert "slack_tokn" in str(info.value)
    assert "extra_forbidden" in str(info.value)


def test_settings_defaults_and_secret_hidden(token: str) -> None:
    default = NotifySettings()
    assert (default.console, default.slack_token, default.slack_channel,
            default.slack_api_url, default.timeout_seconds) == (
        True, None, "#ops-alerts", "https://slack.com/api/", 10.0)
    settings = NotifySettings(slack_token=token)
    assert token not in repr(settings) and token not in str(settings.model_dump())
