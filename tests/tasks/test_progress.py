"""Progress of long steps reaches the Prefect UI as a progress artifact."""

from __future__ import annotations

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from tasks.progress import Progress


@flow
def _long_step() -> str:
    with Progress("copying", total=1000) as p:
        for _ in range(4):
            p.advance(250)
        assert p.percent == 100.0
    return str(flow_run.id)


def test_progress_artifact_ends_at_100():
    run_id = _long_step()
    with get_client(sync_client=True) as client:
        arts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"type": {"any_": ["progress"]}, "flow_run_id": {"any_": [run_id]}},
            "sort": "CREATED_DESC", "limit": 5, "offset": 0}).json()
    assert [(a["description"], a["data"]) for a in arts] == [("copying", 100.0)]
