"""tasks/pitr.py without a cluster: targets, the WAL-gap check, the rendered
pgbackrest.conf and what it refuses, and secrets kept out of errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tasks import pitr
from tasks.errors import ConfigError
from tasks.pitr import PitrConfig, PitrRepo, Target, first_gap, segment_name, segment_number
from tasks.storage import LocalStoreConfig, S3StoreConfig

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)


def test_targets_need_a_zone_and_one_kind():
    assert Target.parse("2026-12-07T10:15:00Z", None).time == datetime(2026, 12, 7, 10, 15, tzinfo=timezone.utc)
    assert Target.parse("2026-12-07 11:15:00+01:00", None).describe() == "2026-12-07 10:15:00 UTC"
    assert Target.parse(None, None).kind == Target.parse("latest", None).kind == "latest"
    assert Target.parse(None, "before-migration-42").options() == ["--type=name", "--target=before-migration-42"]
    with pytest.raises(ConfigError, match="has no zone"):
        Target.parse("2026-12-07 10:15:00", None)
    with pytest.raises(ConfigError, match="not an ISO 8601 time"):
        Target.parse("yesterday", None)
    with pytest.raises(ConfigError, match="not both"):
        Target.parse("2026-12-07T10:15:00Z", "x")
    with pytest.raises(ConfigError, match="restore point"):
        Target.parse(None, "x'; DROP TABLE y")


def test_segment_names_count_across_a_log_file_boundary():
    assert segment_number("0000000100000002000000FF") == (1, 2 * 256 + 255)
    assert segment_name(1, 2 * 256 + 256) == "000000010000000300000000"


def segments(*names: str, at: datetime = T0) -> dict[str, datetime]:
    return {n: at + timedelta(minutes=i) for i, n in enumerate(names)}


def test_first_gap_finds_the_missing_segment_up_to_the_target_only():
    wal = segments("000000010000000000000002", "000000010000000000000003", "000000010000000000000005")
    assert first_gap(wal, "000000010000000000000002", None) == "000000010000000000000004"
    assert first_gap(wal, "000000010000000000000002", T0 + timedelta(seconds=30)) is None  # before the hole
    across = segments("0000000100000000000000FE", "0000000100000000000000FF", "000000010000000100000000")
    assert first_gap(across, "0000000100000000000000FE", None) is None
    other_timeline = segments("000000010000000000000002", "000000020000000000000004")
    assert first_gap(other_timeline, "000000010000000000000002", None) is None  # not followed


def config(**repo: object) -> PitrConfig:
    return PitrConfig(data_dir=Path("/var/lib/postgresql/x"), repos=[PitrRepo(store="local"), PitrRepo(**repo)],
                      config_file=Path("/etc/pgbackrest/x.conf"))


STORES = {"local": LocalStoreConfig(kind="local", path=Path("/srv/pitr")),
          "s3": S3StoreConfig(kind="s3", bucket="dr-bucket", prefix="prod", region="us-west-2",
                              endpoint_url="https://127.0.0.1:9443", sse_kms_key_id="key-123",
                              access_key_id="AKIDEXAMPLE", secret_access_key="s3-secret")}


def test_the_conf_holds_both_repositories_with_kms_and_encryption():
    stanza = pitr.stanza_of("x", config(store="s3", cipher_pass="pass-phrase", verify_tls=False), STORES)
    text = pitr.render_conf(stanza)
    for line in ("repo1-path=/srv/pitr/pgbackrest", "repo2-type=s3", "repo2-s3-bucket=dr-bucket",
                 "repo2-path=/prod/pgbackrest", "repo2-s3-endpoint=127.0.0.1", "repo2-storage-port=9443",
                 "repo2-s3-uri-style=path", "repo2-storage-verify-tls=n", "repo2-s3-kms-key-id=key-123",
                 "repo2-cipher-type=aes-256-cbc", "repo2-cipher-pass=pass-phrase", "repo2-s3-key=AKIDEXAMPLE",
                 "[x]", "pg1-path=/var/lib/postgresql/x", "compress-type=zst"):
        assert line in text.splitlines(), line
    assert pitr.archive_command(stanza) == "pgbackrest --config=/etc/pgbackrest/x.conf --stanza=x archive-push %p"
    message = stanza.scrub("S3 said: key AKIDEXAMPLE secret s3-secret, cipher pass-phrase")
    assert "AKIDEXAMPLE" not in message and "s3-secret" not in message and "pass-phrase" not in message


def test_s3_over_plain_http_is_refused_naming_the_store():
    stores = {**STORES, "s3": STORES["s3"].model_copy(update={"endpoint_url": "http://127.0.0.1:9000"})}
    with pytest.raises(ConfigError, match=r"stores.s3.endpoint_url: pgBackRest speaks only HTTPS"):
        pitr.stanza_of("x", config(store="s3"), stores)


def test_an_unknown_store_and_a_bad_stanza_name_are_refused():
    with pytest.raises(ConfigError, match="no store named 'nope'"):
        pitr.stanza_of("x", config(store="nope"), STORES)
    with pytest.raises(ConfigError, match="not a valid stanza name"):
        pitr.stanza_of("x", config(store="s3").model_copy(update={"stanza": "Bad Name"}), STORES)


def test_the_cause_of_a_failed_start_is_its_own_fatal_line_not_a_refused_connection(tmp_path):
    """Seen under load: the second start after "recovery ended before ..." died, and the
    log's last FATAL was our own poll being refused, which hid the cause."""
    log = tmp_path / "restored.log"
    log.write_text("2026-12-07 05:01:40.1 UTC [10] FATAL:  recovery ended before configured recovery target "
                   "was reached\n")
    second_start = log.stat().st_size
    with open(log, "a") as fh:
        fh.write("2026-12-07 05:01:41.0 UTC [11] LOG:  starting PostgreSQL 15\n"
                 "2026-12-07 05:01:41.2 UTC [12] FATAL:  could not open file \"pg_wal/x\": No such file\n"
                 "2026-12-07 05:01:41.3 UTC [13] FATAL:  the database system is in recovery mode\n"
                 "2026-12-07 05:01:41.4 UTC [14] FATAL:  the database system is not yet accepting connections\n")
    assert pitr.last_fatal(log, second_start) == 'FATAL:  could not open file "pg_wal/x": No such file'
    restored = pitr.Restored(tmp_path / "data", 5999, log, log_from=second_start)
    assert pitr._recovery_error(restored.last_fatal()) is pitr.PitrError  # not TargetNotReached
    with open(log, "a") as fh:
        fh.write("2026-12-07 05:01:42.0 UTC [11] FATAL:  recovery ended before configured recovery target "
                 "was reached\n2026-12-07 05:01:42.1 UTC [15] FATAL:  the database system is shutting down\n")
    assert pitr._recovery_error(restored.last_fatal()) is pitr.TargetNotReached


def test_an_earlier_start_s_failure_is_not_the_cause_of_this_one(tmp_path):
    log = tmp_path / "restored.log"
    log.write_text("2026-12-07 05:01:40.1 UTC [10] FATAL:  recovery ended before configured recovery target "
                   "was reached\n")
    restored = pitr.Restored(tmp_path / "data", 5999, log, log_from=log.stat().st_size)
    with open(log, "a") as fh:
        fh.write("2026-12-07 05:01:41.3 UTC [13] FATAL:  the database system is starting up\n"
                 "2026-12-07 05:01:41.9 UTC [11] LOG:  database system is shut down\n")
    assert pitr._recovery_error(restored.last_fatal()) is pitr.PitrError
    assert restored.last_fatal() == "LOG:  database system is shut down"  # the last word of this start
