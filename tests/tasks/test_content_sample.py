"""Content checksums (tasks.postgres.content_sample): the same rows and checksum in any
copy of the same data, whatever its physical order; a changed value in a sampled row
changes them, one outside the sample does not."""

from __future__ import annotations

import psycopg

from tasks import postgres


def sample(dsn: str, percent: float = 10.0) -> dict:
    with psycopg.connect(dsn) as conn:
        return postgres.content_sample(conn, ["public"], percent)


def test_a_changed_value_in_a_sampled_row_is_found_and_order_does_not_matter(sample_db):
    before = sample(sample_db)
    assert set(before) == {"public.users", "public.api_keys", "public.orders", "public.order_items",
                           "public.audit_logs", "public.rate_limit_tiers"}
    orders = before["public.orders"]
    assert orders.key == ["id"] and 0 < orders.rows < 1000  # about 10 % of the rows
    with psycopg.connect(sample_db) as conn:
        rows = [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]
        sampled = {r[0] for r in conn.execute(
            "SELECT id FROM orders WHERE (hashtextextended(ROW(id)::text, 0) & 65535) < %s",
            (round(65536 * 0.10),))}
        inside, outside = min(sampled), min(set(rows) - sampled)
        # Physical order changes (every row rewritten), content does not.
        conn.execute("UPDATE orders SET total_cents = total_cents")
        conn.execute("CLUSTER orders USING orders_pkey")
    assert sample(sample_db)["public.orders"] == orders
    with psycopg.connect(sample_db) as conn:
        conn.execute("UPDATE orders SET total_cents = total_cents + 1 WHERE id = %s", (outside,))
    assert sample(sample_db)["public.orders"] == orders  # outside the sample: not seen
    with psycopg.connect(sample_db) as conn:
        conn.execute("UPDATE orders SET total_cents = total_cents + 1 WHERE id = %s", (inside,))
    changed = sample(sample_db)
    assert changed["public.orders"].rows == orders.rows and changed["public.orders"].checksum != orders.checksum
    assert postgres.compare_content(before, changed) == [
        f"public.orders: the content of its {orders.rows} sampled rows differs from the manifest"]


def test_the_text_settings_of_the_session_do_not_change_the_checksum(sample_db):
    before = sample(sample_db)
    with psycopg.connect(sample_db) as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        conn.execute("SET DateStyle = 'German'")
        after = postgres.content_sample(conn, ["public"], 10.0)
    assert after == before
