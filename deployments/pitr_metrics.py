"""Point-in-time recovery health as Prometheus metrics, for the receiver's `/metrics`:
the archiver of each cluster with a [pitr] section (read at every scrape, a cheap
query) and its newest backup sets (pgbackrest info, read at most every 5 minutes).

    runbooks_pitr_up{database="orders"} 1                  the cluster answered
    runbooks_pitr_archive_lag_seconds{database="orders"} 12  writes not in the archive yet
    runbooks_pitr_archive_failing{database="orders"} 0      the last archive attempt failed
    runbooks_pitr_archive_failures_total{database="orders"} 3
    runbooks_pitr_last_archived_timestamp_seconds{database="orders"} 1.79e9
    runbooks_pitr_rpo_target_seconds{database="orders"} 60
    runbooks_pitr_last_backup_timestamp_seconds{database="orders", type="full", repo="1"} 1.79e9
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from tasks import pitr
from tasks.report import first_line

INFO_SECONDS = 300.0
log = logging.getLogger("runbooks.pitr_metrics")


class PitrHealth:
    """A prometheus_client collector over a snapshot that `refresh` (blocking) renews."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.names = sorted(n for n, db in settings.databases.items() if db.pitr)
        self.archiver: dict[str, dict[str, Any] | None] = {}
        self.backups: dict[str, dict[tuple[str, int], float]] = {}
        self._info_at: dict[str, float] = {}

    def refresh(self) -> None:
        for name in self.names:
            db = self.settings.database(name)
            try:
                self.archiver[name] = pitr.archiver_status(db.dsn)
            except Exception as exc:  # noqa: BLE001 - a cluster that does not answer is a 0, not a 500
                self.archiver[name] = None
                log.warning("pitr metrics: %s does not answer: %s", name, first_line(exc))
            if time.monotonic() - self._info_at.get(name, -INFO_SECONDS) < INFO_SECONDS:
                continue
            self._info_at[name] = time.monotonic()
            try:
                newest: dict[tuple[str, int], float] = {}
                for b in self.settings.stanza(name).info().backups:
                    if not b.error:
                        key = (b.type, b.repo)
                        newest[key] = max(newest.get(key, 0.0), b.stopped.timestamp())
                self.backups[name] = newest
            except Exception as exc:  # noqa: BLE001
                log.warning("pitr metrics: pgbackrest info of %s failed: %s", name, first_line(exc))

    def collect(self):  # type: ignore[no-untyped-def]
        labels = ["database"]
        up = GaugeMetricFamily("runbooks_pitr_up", "1 if the cluster answered the archiver query", labels=labels)
        lag = GaugeMetricFamily("runbooks_pitr_archive_lag_seconds",
                                "Seconds of writes not in the WAL archive yet (the data a lost disk takes)",
                                labels=labels)
        failing = GaugeMetricFamily("runbooks_pitr_archive_failing", "1 if the last archive attempt failed",
                                    labels=labels)
        failures = GaugeMetricFamily("runbooks_pitr_archive_failures_total",
                                     "Failed archive attempts since the statistics were reset", labels=labels)
        last = GaugeMetricFamily("runbooks_pitr_last_archived_timestamp_seconds",
                                 "When a WAL segment was last archived (unix time)", labels=labels)
        target = GaugeMetricFamily("runbooks_pitr_rpo_target_seconds", "The database's RPO target", labels=labels)
        backup = GaugeMetricFamily("runbooks_pitr_last_backup_timestamp_seconds",
                                   "When the newest backup set of the type ended, per repository (unix time)",
                                   labels=["database", "type", "repo"])
        for name in self.names:
            status = self.archiver.get(name)
            up.add_metric([name], 0 if status is None else 1)
            target.add_metric([name], self.settings.databases[name].pitr.rpo_target_seconds)
            if status is not None:
                lag.add_metric([name], status["lag_seconds"])
                failing.add_metric([name], int(status["failing"]))
                failures.add_metric([name], status["failed_count"] or 0)
                if status["last_archived_time"]:
                    last.add_metric([name], status["last_archived_time"].timestamp())
            for (kind, repo), when in sorted(self.backups.get(name, {}).items()):
                backup.add_metric([name, kind, str(repo)], when)
        return [up, lag, failing, failures, last, target, backup]
