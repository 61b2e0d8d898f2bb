"""Settling a dead run's switch where no cluster is needed: the cases that refuse or only
drop the record. The kills with a real cluster are in tests/flows/test_pitr.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks import pitr_switch
from tasks.pitr import PitrConfig, PitrError, PitrRepo
from tasks.pitr_switch import SwitchRecord

BIN = Path("/nonexistent")  # settle must not reach pg_ctl in these cases


def cfg(tmp_path: Path) -> PitrConfig:
    return PitrConfig(data_dir=tmp_path / "data", repos=[PitrRepo(store="local")])


def test_neither_directory_is_a_clear_refusal_that_keeps_the_record(tmp_path):
    c = cfg(tmp_path)
    pitr_switch.begin(c, SwitchRecord(run="r1", pid=1, pid_started=None, kept=str(tmp_path / "data.replaced-x"),
                                      restored=str(tmp_path / "data.pitr-x")))
    with pytest.raises(PitrError, match=r"left neither .*data nor .*data.replaced-x; nothing was changed"):
        pitr_switch.settle(c, BIN, "postgresql://127.0.0.1/x")
    assert pitr_switch.read(c) is not None


def test_a_switch_that_began_with_production_already_gone_and_moved_nothing_is_dropped(tmp_path):
    c = cfg(tmp_path)
    (tmp_path / "data.pitr-x").mkdir()
    pitr_switch.begin(c, SwitchRecord(run="r2", pid_started=None, kept=None, restored=str(tmp_path / "data.pitr-x")))
    done = pitr_switch.settle(c, BIN, "postgresql://127.0.0.1/x")
    assert len(done) == 1 and done[0].startswith("the switch of run r2 (started ")
    assert done[0].endswith("began with production's data directory already gone and moved nothing; "
                            f"the restored cluster is kept in {tmp_path / 'data.pitr-x'}")
    assert pitr_switch.read(c) is None and (tmp_path / "data.pitr-x").is_dir() and not c.data_dir.exists()


def test_a_record_whose_writer_still_runs_is_not_touched(tmp_path):
    c = cfg(tmp_path)
    (tmp_path / "data.replaced-x").mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = SwitchRecord(run="r3", pid=alive.pid, pid_started=pitr_switch._process_start(alive.pid),
                              kept=str(tmp_path / "data.replaced-x"), restored=str(tmp_path / "data.pitr-x"))
        pitr_switch.begin(c, record)
        with pytest.raises(PitrError, match=rf"is still running as pid {alive.pid} .* not touched"):
            pitr_switch.settle(c, BIN, "postgresql://127.0.0.1/x")
        assert (tmp_path / "data.replaced-x").is_dir() and not c.data_dir.exists()  # nothing moved
    finally:
        alive.kill()
        alive.wait()
    assert not SwitchRecord.model_validate_json(pitr_switch.record_path(c).read_text()).writer_alive()
