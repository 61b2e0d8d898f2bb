"""Tell people what a runbook found: console (run log) and, if configured, Slack.

Why this module exists: every runbook ends with "someone must know" (a restore
test failed, a backup is stale, a failover happened). One `Notification`
shape, one `send`, so flows do not each invent their own message format.

Rules, and why:

* Console is on by default: the Prefect run log is always there, so a
  notification is never lost even when Slack is not configured.
* Slack is opt-in (needs `slack_token`) and must never break a runbook: a
  runbook that restored a database must not fail because Slack was down.
  Any Slack failure becomes one warning line (no traceback) and `send`
  carries on.
* The token never leaves this module: it is a `SecretStr`, it is scrubbed
  from every message we log, and the SDK's own logger (which would log the
  same failure again, at ERROR) is kept out of the log output.
"""

from __future__ import annotations

import logging
import re
from enum import Enum
from collections.abc import Callable
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

__all__ = ["NotifySettings", "Notification", "Severity", "send", "open_channel", "invite", "post"]

LOGGER_NAME = "runbooks.notify"

# slack_sdk logs each failed request at ERROR (and retries at INFO) on the
# logger it is given. We report the failure ourselves as one warning line, so
# the SDK gets a logger that stays silent. To debug the SDK, re-enable it:
# `lg = logging.getLogger("runbooks.notify.slack_sdk"); lg.setLevel(logging.DEBUG); lg.propagate = True`
_SDK_LOG = logging.getLogger(LOGGER_NAME + ".slack_sdk")
_SDK_LOG.setLevel(logging.CRITICAL)
_SDK_LOG.propagate = False

# Slack Block Kit limits (https://api.slack.com/reference/block-kit/blocks).
_MAX_BLOCKS = 50
_MAX_FIELDS_PER_SECTION = 10
_MAX_HEADER_CHARS = 150
_MAX_SECTION_CHARS = 3000
_MAX_FIELD_CHARS = 2000
_MAX_FALLBACK_CHARS = 3000
_MAX_MESSAGE_CHARS = 39_000  # chat.postMessage truncates text beyond 40,000

# Any Slack token shape, scrubbed from log lines in case an error echoes one.
_TOKEN_RE = re.compile(r"xox[a-z]-[A-Za-z0-9-]+")


class NotifySettings(BaseModel):
    """The `notify` config section. Unknown keys are errors, so a typo is not a silent no-op."""

    model_config = ConfigDict(extra="forbid")

    console: bool = True
    slack_token: SecretStr | None = None
    slack_channel: str = "#ops-alerts"
    # Base URL of the Slack Web API; tests point it at a local stand-in.
    slack_api_url: str = "https://slack.com/api/"
    # Slack app's signing secret: the receiver checks the button clicks Slack posts with it.
    slack_signing_secret: SecretStr | None = None
    timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("slack_api_url")
    @classmethod
    def _trailing_slash(cls, value: str) -> str:
        """slack_sdk joins method names onto the base URL; without the slash
        `.../api` + `chat.postMessage` would become `.../chat.postMessage`."""
        return value if value.endswith("/") else value + "/"


class Severity(str, Enum):
    """How urgent a notification is; decides the emoji and the console log level."""

    CRITICAL = "CRITICAL"
    HIGH = "HIGH"
    MEDIUM = "MEDIUM"
    LOW = "LOW"
    INFO = "INFO"


_EMOJI = {
    Severity.CRITICAL: ":rotating_light:",
    Severity.HIGH: ":red_circle:",
    Severity.MEDIUM: ":large_orange_circle:",
    Severity.LOW: ":large_yellow_circle:",
    Severity.INFO: ":information_source:",
}

# CRITICAL and HIGH stand out in the run log; the rest is ordinary news.
_LOG_LEVEL = {
    Severity.CRITICAL: logging.ERROR,
    Severity.HIGH: logging.WARNING,
    Severity.MEDIUM: logging.INFO,
    Severity.LOW: logging.INFO,
    Severity.INFO: logging.INFO,
}


class Notification(BaseModel):
    """What to tell: a title, a sentence, and the measured figures as `fields`.

    Numbers given as field values are turned into strings, so flows can pass
    `{"rows": 1200}` without formatting it first.
    """

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    title: str
    text: str
    severity: Severity = Severity.INFO
    fields: dict[str, str] = Field(default_factory=dict)
    run_url: str | None = None


def send(settings: NotifySettings, note: Notification) -> list[str]:
    """Deliver `note` to every configured channel; return the channels that got it.

    Never raises because of Slack: a failed Slack delivery is one warning
    line and "slack" is then missing from the result.
    """
    delivered: list[str] = []
    log = _logger()
    if settings.console:
        log.log(_LOG_LEVEL[note.severity], _console_message(note))
        delivered.append("console")
    token = _token(settings)
    if token:
        if _send_slack(settings, note, token, log):
            delivered.append("slack")
    return delivered


# --------------------------------------------------------------------------- helpers


def _logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """The Prefect run logger inside a flow/task run (shows in the UI), else ours."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(LOGGER_NAME)


def _headline(note: Notification) -> str:
    line = f"[{note.severity.value}] {note.title}"
    return f"{line} — {note.text}" if note.text else line


def _console_message(note: Notification) -> str:
    """`[HIGH] Title — text`, then one aligned `key: value` line per field."""
    lines = [_headline(note)]
    width = max((len(k) for k in note.fields), default=0)
    lines += [f"  {k.ljust(width)} : {v}" for k, v in note.fields.items()]
    if note.run_url:
        lines.append(f"  run: {note.run_url}")
    return "\n".join(lines)


def _send_slack(
    settings: NotifySettings,
    note: Notification,
    token: str,
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> bool:
    """Post to Slack; on any failure log one scrubbed warning and return False."""
    sent = _slack_call(settings, f"Slack notification to {settings.slack_channel}",
                       lambda client: client.chat_postMessage(
                           channel=settings.slack_channel,
                           text=_truncate(_escape(_headline(note)), _MAX_FALLBACK_CHARS),
                           blocks=_blocks(note)),
                       token=token, log=log)
    return sent is not None


def _slack_call(settings: NotifySettings, what: str, call: Callable[[WebClient], Any], token: str | None = None,
                log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
                tolerate: tuple[str, ...] = ()) -> Any:
    """One Slack Web API call; its response, or None after one scrubbed warning line.
    Errors named in `tolerate` (e.g. already_in_channel) come back as their response."""
    token = token or _token(settings)
    log = log or _logger()
    try:
        client = WebClient(
            token=token,
            base_url=settings.slack_api_url,
            # The SDK hands this straight to urlopen, which takes a float;
            # int() would turn 0.5 into 0, a non-blocking socket that always fails.
            timeout=settings.timeout_seconds,  # type: ignore[arg-type]
            logger=_SDK_LOG,
        )
        return call(client)
    except Exception as exc:  # noqa: BLE001 - Slack must never break a runbook
        if isinstance(exc, SlackApiError):
            resp = exc.response
            if resp.get("error") in tolerate:
                return resp
            reason = f"Slack API answered HTTP {resp.status_code}, error={resp.get('error')!r}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        log.warning(_one_line(f"{what} not delivered ({reason}); the runbook carries on.", token))
        return None


def _token(settings: NotifySettings) -> str:
    return settings.slack_token.get_secret_value().strip() if settings.slack_token else ""


def slack_configured(settings: NotifySettings) -> bool:
    return bool(_token(settings))


def open_channel(settings: NotifySettings, name: str, members: list[str]) -> str | None:
    """The id of the public channel `name`, created if missing (conversations.create;
    a name already taken is looked up, so a retried run finds its channel), with
    `members` (Slack user ids) invited. None when Slack is not configured or refused."""
    if not slack_configured(settings):
        return None
    created = _slack_call(settings, f"Slack channel #{name}",
                          lambda client: client.conversations_create(name=name, is_private=False),
                          tolerate=("name_taken",))
    if created is None:
        return None
    channel_id = created.get("channel", {}).get("id") if created.get("ok") else _find_channel(settings, name)
    if channel_id and members:
        invite(settings, channel_id, members)
    return channel_id


def _find_channel(settings: NotifySettings, name: str) -> str | None:
    cursor = None
    for _ in range(50):  # 50 pages of 200: enough for any workspace we look after
        page = _slack_call(settings, f"Slack channel lookup of #{name}", lambda client: client.conversations_list(
            types="public_channel", exclude_archived=True, limit=200, cursor=cursor))
        if page is None:
            return None
        for channel in page.get("channels", []):
            if channel.get("name") == name:
                return channel.get("id")
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            return None
    return None


def invite(settings: NotifySettings, channel_id: str, users: list[str]) -> bool:
    """conversations.invite; people already in the channel are not an error."""
    if not users or not slack_configured(settings):
        return False
    done = _slack_call(settings, f"Slack invitation of {len(users)} people",
                       lambda client: client.conversations_invite(channel=channel_id, users=",".join(users)),
                       tolerate=("already_in_channel",))
    return done is not None


def post(settings: NotifySettings, channel: str, text: str, blocks: list[dict[str, Any]] | None = None) -> bool:
    """chat.postMessage of `text` (mrkdwn) to `channel` (id or #name); False on any failure."""
    if not slack_configured(settings):
        return False
    done = _slack_call(settings, f"Slack message to {channel}", lambda client: client.chat_postMessage(
        channel=channel, text=_truncate(text, _MAX_MESSAGE_CHARS), blocks=blocks,
        unfurl_links=False, mrkdwn=True))
    return done is not None


def _blocks(note: Notification) -> list[dict[str, Any]]:
    """Block Kit: header (emoji + title), text, field sections of ≤10, context."""
    header = {
        "type": "header",
        "text": {
            "type": "plain_text",
            "text": _truncate(f"{_EMOJI[note.severity]} {note.title}", _MAX_HEADER_CHARS),
            "emoji": True,
        },
    }
    blocks: list[dict[str, Any]] = [header]
    if note.text.strip():
        blocks.append(_mrkdwn_section(_truncate(_escape(note.text), _MAX_SECTION_CHARS)))

    fields = [
        {"type": "mrkdwn",
         "text": _truncate(f"*{_escape(k)}*\n{_escape(v) or '—'}", _MAX_FIELD_CHARS)}
        for k, v in note.fields.items()
    ]
    chunks = [fields[i:i + _MAX_FIELDS_PER_SECTION]
              for i in range(0, len(fields), _MAX_FIELDS_PER_SECTION)]
    room = _MAX_BLOCKS - len(blocks) - 1  # keep one block for the context
    hidden = sum(len(c) for c in chunks[room:])
    blocks += [{"type": "section", "fields": chunk} for chunk in chunks[:room]]

    context = [{"type": "mrkdwn", "text": f"Severity: *{note.severity.value}*"}]
    if hidden:
        context.append({"type": "mrkdwn", "text": f"{hidden} more fields in the run log"})
    if note.run_url:
        url = _escape(note.run_url).replace("|", "%7C")
        context.append({"type": "mrkdwn", "text": f"<{url}|Open the flow run>"})
    blocks.append({"type": "context", "elements": context})
    return blocks


def _mrkdwn_section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _escape(text: str) -> str:
    """Slack's three control characters; everything else (*bold*, `code`) stays."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str, token: str) -> str:
    """Collapse to one line and remove the token (and anything token-shaped)."""
    text = " ".join(text.split())
    if token:
        text = text.replace(token, "***")
    return _TOKEN_RE.sub("***", text)
