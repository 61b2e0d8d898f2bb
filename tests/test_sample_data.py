"""demo.sample_data against the local PostgreSQL (tests/conftest.py: pg_admin, make_database):
counts, integrity, determinism, and refusal to mix two data sets."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from demo import sample_data

ROWS = 20_000


@pytest.fixture
def make_db(make_database):
    """Scratch databases named rb_sample_<hex>; conftest's make_database drops them."""
    return lambda: make_database("rb_sample")


@pytest.fixture
def db(make_db) -> str:
    return make_db()


def _counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return sample_data.exact_counts(conn)


def test_build_counts_and_integrity(db: str) -> None:
    counts = sample_data.build(db, rows=ROWS)

    assert set(counts) == set(sample_data.ALL_TABLES)
    assert sum(counts.values()) >= ROWS
    assert counts == sample_data.plan_counts(ROWS)
    assert counts["rate_limit_tiers"] == 4
    with psycopg.connect(db) as conn:
        for table, expected in counts.items():
            got = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", table))
            ).fetchone()[0]
            assert got == expected, table
        # Only SHA-256 hex digests are stored, never keys.
        assert conn.execute(
            "SELECT count(*) FROM api_keys WHERE key_hash !~ '^[0-9a-f]{64}$'"
        ).fetchone()[0] == 0
        assert conn.execute(
            "SELECT count(DISTINCT key_hash) FROM api_keys WHERE key_prefix ~ '^fq_live_[0-9a-f]{8}$'"
        ).fetchone()[0] == counts["api_keys"]
        assert conn.execute(
            "SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = o.user_id)"
        ).fetchone()[0] == 0
        assert conn.execute(
            "SELECT count(*) FROM order_items i"
            " WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = i.order_id)"
        ).fetchone()[0] == 0
        # Order totals are the sum of their lines.
        assert conn.execute(
            "SELECT count(*) FROM orders o WHERE o.total_cents <> (SELECT coalesce(sum("
            "i.quantity * i.unit_price_cents), 0) FROM order_items i WHERE i.order_id = o.id)"
        ).fetchone()[0] == 0
        assert dict(conn.execute("SELECT tier, requests_per_minute FROM rate_limit_tiers").fetchall()) == (
            sample_data.RATE_LIMIT_TIERS
        )
        # Sequences continue after the generated ids.
        for table in sample_data.DATA_TABLES:
            next_id = conn.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, 'id'))", (f"public.{table}",)
            ).fetchone()[0]
            assert next_id == counts[table] + 1, table
        fkeys = {r[0] for r in conn.execute("SELECT conname FROM pg_constraint WHERE contype = 'f'")}
        assert fkeys == {"api_keys_user_id_fkey", "orders_user_id_fkey", "order_items_order_id_fkey"}
        analyzed = conn.execute(
            "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL"
        ).fetchone()[0]
        assert analyzed == len(sample_data.ALL_TABLES)


def test_build_twice_refuses_and_leaves_data(db: str) -> None:
    first = sample_data.build(db, rows=ROWS)
    with pytest.raises(ValueError, match="already hold rows"):
        sample_data.build(db, rows=ROWS, seed=8)
    assert _counts(db) == first


def test_create_schema_is_idempotent_and_populate_works_on_it(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        sample_data.create_schema(conn)
        sample_data.create_schema(conn)
        counts = sample_data.populate(conn, rows=2_000)
        assert counts == sample_data.exact_counts(conn)
        assert sum(counts.values()) >= 2_000
        sample_data.create_schema(conn)
        assert sample_data.exact_counts(conn) == counts


def test_same_seed_same_data(make_db) -> None:
    checksum = (
        "SELECT md5(string_agg(t::text, '|' ORDER BY t.id)) FROM {} AS t"
    )

    def digest(dsn: str) -> dict[str, str]:
        with psycopg.connect(dsn) as conn:
            return {
                table: conn.execute(
                    sql.SQL(checksum).format(sql.Identifier("public", table))
                ).fetchone()[0]
                for table in sample_data.DATA_TABLES
            }

    a, b, c = make_db(), make_db(), make_db()
    sample_data.build(a, rows=5_000, seed=7)
    # Another session time zone (with DST) must not change the data.
    sample_data.build(f"{b} options='-c TimeZone=America/New_York -c extra_float_digits=0'", rows=5_000, seed=7)
    sample_data.build(c, rows=5_000, seed=8)
    assert digest(a) == digest(b)
    assert digest(a)["users"] != digest(c)["users"]


def test_plan_and_size_estimates() -> None:
    for rows in (0, 1, 7, 100, 20_000, 1_000_003):
        plan = sample_data.plan_counts(rows)
        assert sum(plan.values()) >= rows
        assert all(n >= 0 for n in plan.values())
        if plan["order_items"]:
            assert plan["orders"] > 0
    assert sum(sample_data.plan_counts(100_000).values()) == 100_000
    with pytest.raises(ValueError):
        sample_data.plan_counts(-1)
    assert sample_data.rows_for_size(0) == 0
    small, big = sample_data.rows_for_size(100 << 20), sample_data.rows_for_size(1 << 30)
    assert 0 < small < big
