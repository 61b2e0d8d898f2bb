"""The demo's sample database, shaped like a production GraphQL API's data.

The reference system is FraiseQL: users, API keys with tiers and rate limits,
audit logs, and orders with line items. Backups, restores and verification in
the demo need a database that looks like that (foreign keys, sequences, jsonb,
indexes, skewed distributions), at a size chosen on the command line, so:

* every row is generated server side (``INSERT ... SELECT ... FROM
  generate_series``), never in a Python loop, so 100k rows take a fraction of a
  second and millions of rows scale linearly;
* the data is deterministic for a seed (``setseed`` plus ``random()`` drawn in
  ``generate_series`` order, timestamps relative to a fixed anchor rather than
  ``now()``), so two builds with the same seed are identical and a restore can
  be compared against a fresh build;
* API keys are stored as SHA-256 hashes and a display prefix only, as a real
  API would: the raw key exists only inside the generating expression.

Usage: ``python -m demo.sample_data DSN [--rows N | --size-mb MB] [--seed S]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import psycopg
from psycopg import sql

SCHEMA = "public"

# Tier name -> requests per minute. Also the tier CHECK constraint's domain.
RATE_LIMIT_TIERS: dict[str, int] = {
    "free": 60,
    "standard": 600,
    "premium": 3000,
    "enterprise": 10000,
}

# Tables populate() fills, in foreign-key order (parents first).
DATA_TABLES: tuple[str, ...] = ("users", "api_keys", "orders", "order_items", "audit_logs")
# Every table of the sample schema; the keys of the dicts populate()/build() return.
ALL_TABLES: tuple[str, ...] = ("rate_limit_tiers", *DATA_TABLES)

# Share of the requested rows each data table gets (order_items takes the remainder).
_SHARES: dict[str, float] = {"users": 0.05, "api_keys": 0.05, "orders": 0.25, "audit_logs": 0.20}

# Timestamps are laid out backwards from this instant instead of now(), so a seed
# always yields the same data.
ANCHOR = "2025-01-01 00:00:00+00"

# Measured on the local PostgreSQL 15.20 (8 kB pages, default fillfactor, seed 7):
# pg_database_size() of a fresh database after create_schema() only, and after
# build() (data, indexes, foreign keys, ANALYZE):
#   schema only      ->   8,084,839 bytes (template1's catalogs plus empty tables)
#   rows=200,000     ->  42,802,535 bytes -> 173.6 bytes/row above that
#   rows=1,000,000   -> 180,845,927 bytes -> 172.8 bytes/row
#   rows=5,000,000   -> 873,045,351 bytes -> 173.0 bytes/row
# i.e. linear; heap plus indexes. pgserver's PostgreSQL 16.2 measured 173.5 bytes/row
# (200k rows over a 7,819,747-byte empty database): the estimate holds within 1%.
EMPTY_DATABASE_BYTES = 8_084_839
BYTES_PER_ROW = 173.0

_FIRST_NAMES = [
    "Ada", "Alan", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances",
    "Edsger", "Radia", "Guido", "Sophie", "Bjarne", "Hedy", "Donald", "Karen", "Tim",
    "Anita", "John", "Shafi", "Leslie", "Lucia", "Yukihiro", "Mary", "Niklaus", "Joan",
    "Whitfield", "Adele", "Vint",
]
_LAST_NAMES = [
    "Lovelace", "Turing", "Hopper", "Torvalds", "Liskov", "Thompson", "Hamilton",
    "Ritchie", "Allen", "Dijkstra", "Perlman", "Rossum", "Wilson", "Stroustrup", "Lamarr",
    "Knuth", "Jones", "Berners-Lee", "Borg", "McCarthy", "Goldwasser", "Lamport",
    "Moreau", "Matsumoto", "Keller", "Wirth", "Clarke", "Diffie", "Goldberg", "Cerf",
]
# (action, GraphQL operation that caused it); repeats weight the common events.
_AUDIT_EVENTS: list[tuple[str, str]] = [
    ("user.login", "login"), ("user.login", "login"), ("user.login", "login"),
    ("user.logout", "logout"), ("user.update", "updateUser"),
    ("api_key.create", "createApiKey"), ("api_key.revoke", "revokeApiKey"),
    ("api_key.rate_limited", "orders"),
    ("order.create", "createOrder"), ("order.create", "createOrder"),
    ("order.update", "updateOrder"), ("order.refund", "refundOrder"),
    ("graphql.mutation", "updateUser"), ("graphql.mutation", "createOrder"),
    ("graphql.query_denied", "adminUsers"),
]
_USER_AGENTS = [
    "fraiseql-client/1.4.2 (python)", "fraiseql-client/1.5.0 (python)",
    "Apollo/3.9 (web)", "urql/4.0 (web)", "curl/8.5.0", "okhttp/4.12.0 (android)",
    "CFNetwork/1490 (ios)",
]


# Tables, with the constraints cheap to keep during a bulk load (primary keys,
# users.email's unique index, CHECKs). Secondary indexes and foreign keys are in
# _INDEXES and _FOREIGN_KEYS so build() can add them after loading: one sort per
# index and one anti-join per key instead of per-row index inserts and RI triggers.
_TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS {schema}.rate_limit_tiers (
        tier text PRIMARY KEY CHECK (tier IN ({tiers})),
        requests_per_minute integer NOT NULL CHECK (requests_per_minute > 0)
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.users (
        id bigserial PRIMARY KEY,
        email text NOT NULL UNIQUE,
        name text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        status text NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'suspended', 'deleted'))
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.api_keys (
        id bigserial PRIMARY KEY,
        user_id bigint NOT NULL,
        key_prefix text NOT NULL,
        key_hash text NOT NULL CHECK (key_hash ~ '^[0-9a-f]{{64}}$'),
        tier text NOT NULL DEFAULT 'free' CHECK (tier IN ({tiers})),
        created_at timestamptz NOT NULL DEFAULT now(),
        revoked_at timestamptz,
        last_used_at timestamptz,
        revoke_reason text,
        permissions text[] NOT NULL DEFAULT '{{orders:read,profile:read}}',
        replaced_by bigint
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.orders (
        id bigserial PRIMARY KEY,
        user_id bigint NOT NULL,
        status text NOT NULL DEFAULT 'pending' CHECK (status IN
            ('pending', 'paid', 'shipped', 'delivered', 'cancelled', 'refunded')),
        total_cents bigint NOT NULL DEFAULT 0 CHECK (total_cents >= 0),
        currency text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{{3}}$'),
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.order_items (
        id bigserial PRIMARY KEY,
        order_id bigint NOT NULL,
        sku text NOT NULL,
        quantity integer NOT NULL CHECK (quantity > 0),
        unit_price_cents bigint NOT NULL CHECK (unit_price_cents >= 0)
    )""",
    # actor_user_id has no foreign key on purpose: audit rows outlive the users
    # they mention, and NULL is a system action.
    """CREATE TABLE IF NOT EXISTS {schema}.audit_logs (
        id bigserial PRIMARY KEY,
        actor_user_id bigint,
        action text NOT NULL,
        target text,
        details jsonb NOT NULL DEFAULT '{{}}',
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
)

# Lookups the API does on every request (key_hash), plus the joins and time-range
# scans its resolvers and the audit UI do. Index name -> definition.
_INDEXES: dict[str, str] = {
    "api_keys_key_hash_key": "CREATE UNIQUE INDEX IF NOT EXISTS {name} ON {schema}.api_keys (key_hash)",
    "api_keys_user_id_idx": "CREATE INDEX IF NOT EXISTS {name} ON {schema}.api_keys (user_id)",
    "orders_user_id_idx": "CREATE INDEX IF NOT EXISTS {name} ON {schema}.orders (user_id)",
    "orders_created_at_idx": "CREATE INDEX IF NOT EXISTS {name} ON {schema}.orders (created_at)",
    "order_items_order_id_idx": "CREATE INDEX IF NOT EXISTS {name} ON {schema}.order_items (order_id)",
    "audit_logs_created_at_idx": "CREATE INDEX IF NOT EXISTS {name} ON {schema}.audit_logs (created_at)",
    "audit_logs_actor_user_id_idx":
        "CREATE INDEX IF NOT EXISTS {name} ON {schema}.audit_logs (actor_user_id)",
}

# (table, column, referenced table, ON DELETE action); named as PostgreSQL names
# inline REFERENCES constraints (<table>_<column>_fkey).
_FOREIGN_KEYS: tuple[tuple[str, str, str, str], ...] = (
    ("api_keys", "user_id", "users", "NO ACTION"),
    ("orders", "user_id", "users", "NO ACTION"),
    ("order_items", "order_id", "orders", "CASCADE"),
)


def _qualified(table: str) -> sql.Identifier:
    return sql.Identifier(SCHEMA, table)


def _create_tables(cur: psycopg.Cursor) -> None:
    """Tables and the rate-limit tiers, without secondary indexes or foreign keys."""
    tiers = sql.SQL(", ").join(sql.Literal(t) for t in RATE_LIMIT_TIERS)
    for stmt in _TABLES:
        cur.execute(sql.SQL(stmt).format(schema=sql.Identifier(SCHEMA), tiers=tiers))
    cur.executemany(
        sql.SQL(
            "INSERT INTO {}.rate_limit_tiers (tier, requests_per_minute) VALUES (%s, %s)"
            " ON CONFLICT (tier) DO NOTHING"
        ).format(sql.Identifier(SCHEMA)),
        list(RATE_LIMIT_TIERS.items()),
    )


def _create_indexes_and_keys(cur: psycopg.Cursor) -> None:
    """Add whichever secondary indexes and foreign keys are missing (idempotent)."""
    schema = sql.Identifier(SCHEMA)
    for name, stmt in _INDEXES.items():
        cur.execute(sql.SQL(stmt).format(name=sql.Identifier(name), schema=schema))
    for table, column, ref, on_delete in _FOREIGN_KEYS:
        name = f"{table}_{column}_fkey"
        cur.execute(
            "SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass(%s) AND conname = %s",
            (f"{SCHEMA}.{table}", name),
        )
        if cur.fetchone() is None:
            cur.execute(
                sql.SQL(
                    "ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column})"
                    " REFERENCES {ref} (id) ON DELETE {on_delete}"
                ).format(
                    table=_qualified(table),
                    name=sql.Identifier(name),
                    column=sql.Identifier(column),
                    ref=_qualified(ref),
                    on_delete=sql.SQL(on_delete),  # from the constant above, never input
                )
            )


def create_schema(conn: psycopg.Connection) -> None:
    """Create the sample tables, indexes, foreign keys and rate-limit tiers if missing.

    Idempotent, so the demo can run it on every start; it never drops or
    rewrites anything that already exists.
    """
    with conn.transaction(), conn.cursor() as cur:
        _create_tables(cur)
        _create_indexes_and_keys(cur)


def plan_counts(rows: int) -> dict[str, int]:
    """How many rows each table gets so the total is `rows` (never less).

    Separate from populate() so callers can show the plan before building.
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    counts = {"rate_limit_tiers": len(RATE_LIMIT_TIERS)}
    counts["users"] = max(1, math.floor(rows * _SHARES["users"]))
    counts["api_keys"] = math.floor(rows * _SHARES["api_keys"])
    counts["orders"] = math.floor(rows * _SHARES["orders"])
    counts["audit_logs"] = math.floor(rows * _SHARES["audit_logs"])
    rest = rows - sum(counts.values())
    counts["order_items"] = max(0, rest) if counts["orders"] else 0
    if counts["orders"] == 0 and rest > 0:  # tiny sizes: give the remainder to audit_logs
        counts["audit_logs"] += rest
    return {t: counts[t] for t in ALL_TABLES}


def _seed_value(seed: int) -> float:
    """Map an int seed into setseed()'s [-1, 1) range (distinct for 0 <= seed < 2**31)."""
    return (seed % (1 << 31)) / float(1 << 31) * 2.0 - 1.0


def exact_counts(conn: psycopg.Connection) -> dict[str, int]:
    """count(*) of every sample table: what populate() and build() report."""
    query = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {}::text, count(*) FROM {}").format(sql.Literal(t), _qualified(t))
        for t in ALL_TABLES
    )
    with conn.cursor() as cur:
        cur.execute(query)
        got = dict(cur.fetchall())
    return {t: int(got[t]) for t in ALL_TABLES}


def analyze(conn: psycopg.Connection) -> None:
    """ANALYZE the sample tables so plans (and the demo's row estimates) are sane."""
    tables = sql.SQL(", ").join(_qualified(t) for t in ALL_TABLES)
    conn.execute(sql.SQL("ANALYZE {}").format(tables))


# Each generator draws every random() it needs in a fenced subquery (OFFSET 0) in
# generate_series order, and only derives values outside it, so the output does not
# depend on join order or hash batching and is the same for a seed on every run.
# Hashed randomness goes through random() * 2^52 as a bigint's text (exact, since
# random() has 52 random bits): random()::text would depend on extra_float_digits.

_USERS_SQL = """
INSERT INTO public.users (id, email, name, created_at, status)
SELECT s.g,
       lower(s.first_name) || '.' || lower(s.last_name) || s.g || '@example.com',
       s.first_name || ' ' || s.last_name,
       %(anchor)s::timestamptz - s.r_created * interval '1095 days',
       CASE WHEN s.r_status < 0.90 THEN 'active'
            WHEN s.r_status < 0.96 THEN 'suspended'
            ELSE 'deleted' END
FROM (
    SELECT g,
           (%(first)s::text[])[1 + floor(random() * cardinality(%(first)s::text[]))::int] AS first_name,
           (%(last)s::text[])[1 + floor(random() * cardinality(%(last)s::text[]))::int] AS last_name,
           random() AS r_created,
           random() AS r_status
    FROM generate_series(1::bigint, %(n)s::bigint) AS g
    OFFSET 0
) AS s
"""

# The raw key ('fq_live_' + 64 hex) is only ever an expression here: the table
# keeps its display prefix and its SHA-256.
_API_KEYS_SQL = """
INSERT INTO public.api_keys
    (id, user_id, key_prefix, key_hash, tier, created_at, revoked_at, last_used_at)
SELECT s.g, s.user_id,
       left(s.raw_key, 16),
       encode(sha256(convert_to(s.raw_key, 'UTF8')), 'hex'),
       CASE WHEN s.r_tier < 0.60 THEN 'free'
            WHEN s.r_tier < 0.85 THEN 'standard'
            WHEN s.r_tier < 0.95 THEN 'premium'
            ELSE 'enterprise' END,
       c.created_at, r.revoked_at,
       CASE WHEN s.r_used < 0.80
            THEN c.created_at + (s.r_used / 0.80)
                 * (coalesce(r.revoked_at, %(anchor)s::timestamptz) - c.created_at)
       END
FROM (
    SELECT g,
           1 + floor(random() * %(users)s::bigint)::bigint AS user_id,
           'fq_live_'
               || md5(((random() * 4503599627370496)::bigint)::text)
               || md5(((random() * 4503599627370496)::bigint)::text) AS raw_key,
           random() AS r_tier,
           random() AS r_created,
           random() AS r_revoked,
           random() AS r_used
    FROM generate_series(1::bigint, %(n)s::bigint) AS g
    OFFSET 0
) AS s
JOIN public.users AS u ON u.id = s.user_id
CROSS JOIN LATERAL (
    SELECT u.created_at + s.r_created * (%(anchor)s::timestamptz - u.created_at) AS created_at
) AS c
CROSS JOIN LATERAL (
    SELECT CASE WHEN s.r_revoked < 0.10
                THEN c.created_at + (s.r_revoked / 0.10) * (%(anchor)s::timestamptz - c.created_at)
           END AS revoked_at
) AS r
"""

# Line items are staged first so each order's total_cents is the exact sum of its
# items. The first `orders` items give every order at least one line.
_ITEMS_STAGE_SQL = """
CREATE TEMPORARY TABLE _sample_order_items ON COMMIT DROP AS
SELECT s.g AS id,
       CASE WHEN s.g <= %(orders)s::bigint THEN s.g
            ELSE 1 + floor(s.r_order * %(orders)s::bigint)::bigint END AS order_id,
       'SKU-' || lpad((1 + floor(s.r_sku * s.r_sku * 5000))::int::text, 5, '0') AS sku,
       (1 + floor(s.r_qty * s.r_qty * s.r_qty * 5))::int AS quantity,
       (floor(s.r_price * s.r_price * 300)::bigint * 100 + 99) AS unit_price_cents
FROM (
    SELECT g, random() AS r_order, random() AS r_sku, random() AS r_qty, random() AS r_price
    FROM generate_series(1::bigint, %(n)s::bigint) AS g
    OFFSET 0
) AS s
"""

# Orders skew towards a minority of heavy users (random() * random()).
_ORDERS_SQL = """
INSERT INTO public.orders (id, user_id, status, total_cents, currency, created_at)
SELECT s.g, s.user_id,
       CASE WHEN s.r_status < 0.04 THEN 'pending'
            WHEN s.r_status < 0.19 THEN 'paid'
            WHEN s.r_status < 0.29 THEN 'shipped'
            WHEN s.r_status < 0.92 THEN 'delivered'
            WHEN s.r_status < 0.97 THEN 'cancelled'
            ELSE 'refunded' END,
       coalesce(t.total_cents, 0),
       CASE WHEN s.r_currency < 0.70 THEN 'USD'
            WHEN s.r_currency < 0.90 THEN 'EUR'
            ELSE 'GBP' END,
       u.created_at + s.r_created * (%(anchor)s::timestamptz - u.created_at)
FROM (
    SELECT g,
           1 + floor(random() * random() * %(users)s::bigint)::bigint AS user_id,
           random() AS r_status,
           random() AS r_currency,
           random() AS r_created
    FROM generate_series(1::bigint, %(n)s::bigint) AS g
    OFFSET 0
) AS s
JOIN public.users AS u ON u.id = s.user_id
LEFT JOIN (
    SELECT order_id, sum(quantity * unit_price_cents)::bigint AS total_cents
    FROM _sample_order_items
    GROUP BY order_id
) AS t ON t.order_id = s.g
"""

_ITEMS_SQL = """
INSERT INTO public.order_items (id, order_id, sku, quantity, unit_price_cents)
SELECT id, order_id, sku, quantity, unit_price_cents FROM _sample_order_items
"""

_AUDIT_LOGS_SQL = """
INSERT INTO public.audit_logs (id, actor_user_id, action, target, details, created_at)
SELECT s.g, s.actor_user_id, s.action,
       CASE WHEN s.action LIKE 'order.%%' AND %(orders)s::bigint > 0
                THEN 'order:' || (1 + floor(s.r_target * %(orders)s::bigint)::bigint)
            WHEN s.action LIKE 'api_key.%%' AND %(api_keys)s::bigint > 0
                THEN 'api_key:' || (1 + floor(s.r_target * %(api_keys)s::bigint)::bigint)
            WHEN s.action LIKE 'graphql.%%' THEN 'graphql:' || s.operation
            ELSE 'user:' || coalesce(s.actor_user_id, 1 + floor(s.r_target * %(users)s::bigint)::bigint)
       END,
       jsonb_build_object(
           'ip', format('10.%%s.%%s.%%s', (s.ip >> 16) & 255, (s.ip >> 8) & 255, s.ip & 255),
           'user_agent', s.user_agent,
           'request_id', s.request_id,
           'operation', s.operation,
           'duration_ms', round((s.r_duration * s.r_duration * 2000)::numeric, 1)
       ),
       %(anchor)s::timestamptz - s.r_created * interval '90 days'
FROM (
    SELECT e.g,
           CASE WHEN e.r_actor >= 0.08  -- 8%% are system actions with no actor
                THEN 1 + floor((e.r_actor - 0.08) / 0.92 * %(users)s::bigint)::bigint
           END AS actor_user_id,
           (%(actions)s::text[])[e.event] AS action,
           (%(operations)s::text[])[e.event] AS operation,
           e.r_target, e.ip, e.user_agent, e.request_id, e.r_duration, e.r_created
    FROM (
        SELECT g,
               random() AS r_actor,
               1 + floor(random() * cardinality(%(actions)s::text[]))::int AS event,
               random() AS r_target,
               floor(random() * 16777216)::int AS ip,
               (%(agents)s::text[])[1 + floor(random() * cardinality(%(agents)s::text[]))::int] AS user_agent,
               md5(((random() * 4503599627370496)::bigint)::text) AS request_id,
               random() AS r_duration,
               random() AS r_created
        FROM generate_series(1::bigint, %(n)s::bigint) AS g
        OFFSET 0
    ) AS e
) AS s
"""


def populate(
    conn: psycopg.Connection,
    rows: int = 100_000,
    seed: int = 7,
    *,
    analyze_after: bool = True,
) -> dict[str, int]:
    """Fill the (empty) sample tables with about `rows` rows in all, deterministically.

    Runs in one transaction (a savepoint if the caller already has one open), so
    a failure leaves the tables as they were. Refuses with ValueError when any
    data table already has rows, so it never mixes two data sets. Returns exact
    count(*) per table; ANALYZEs at the end unless `analyze_after` is False
    (build() analyzes after its commit instead).
    """
    plan = plan_counts(rows)
    params = {
        "anchor": ANCHOR,
        "users": plan["users"],
        "orders": plan["orders"],
        "api_keys": plan["api_keys"],
    }
    data_tables = sql.SQL(", ").join(_qualified(t) for t in DATA_TABLES)
    with conn.transaction(), conn.cursor() as cur:
        # Hold off concurrent writers (and a concurrent populate) until we commit.
        cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(data_tables))
        cur.execute(
            sql.SQL(" UNION ALL ").join(
                sql.SQL("(SELECT {}::text FROM {} LIMIT 1)").format(sql.Literal(t), _qualified(t))
                for t in DATA_TABLES
            )
        )
        nonempty = [r[0] for r in cur.fetchall()]
        if nonempty:
            raise ValueError(
                "sample tables already hold rows (" + ", ".join(nonempty) + "); "
                "build into a fresh database or empty them first, so data sets never mix"
            )
        # Timestamp arithmetic in UTC (no DST), whatever the session's TimeZone;
        # restored below, and undone by the rollback on error.
        cur.execute("SELECT current_setting('TimeZone'), set_config('TimeZone', 'UTC', true)")
        (session_tz, _) = cur.fetchone()
        cur.execute("SELECT setseed(%s)", (_seed_value(seed),))
        cur.execute(
            _USERS_SQL,
            {**params, "n": plan["users"], "first": _FIRST_NAMES, "last": _LAST_NAMES},
        )
        cur.execute(_API_KEYS_SQL, {**params, "n": plan["api_keys"]})
        cur.execute(_ITEMS_STAGE_SQL, {**params, "n": plan["order_items"]})
        cur.execute(_ORDERS_SQL, {**params, "n": plan["orders"]})
        cur.execute(_ITEMS_SQL)
        cur.execute("DROP TABLE _sample_order_items")
        cur.execute(
            _AUDIT_LOGS_SQL,
            {
                **params,
                "n": plan["audit_logs"],
                "actions": [action for action, _ in _AUDIT_EVENTS],
                "operations": [operation for _, operation in _AUDIT_EVENTS],
                "agents": _USER_AGENTS,
            },
        )
        # Ids were given explicitly; move each bigserial sequence past them so the
        # application's own inserts (and a restored copy) continue without clashes.
        for table in DATA_TABLES:
            cur.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({name}, 'id'),"
                    " coalesce(max(id), 0) + 1, false) FROM {table}"
                ).format(name=sql.Literal(f"{SCHEMA}.{table}"), table=_qualified(table))
            )
        counts = exact_counts(conn)
        cur.execute("SELECT set_config('TimeZone', %s, true)", (session_tz,))
    if analyze_after:
        analyze(conn)
    return counts


def build(dsn: str, rows: int = 100_000, seed: int = 7) -> dict[str, int]:
    """Create the schema and sample data in an existing database; return exact counts.

    Schema and data go in one transaction, so a failed build leaves nothing
    behind; ANALYZE runs after the commit. Secondary indexes and foreign keys are
    added after the load (same end state as create_schema(), about twice as
    fast). Raises ValueError if the tables already hold rows.
    """
    with psycopg.connect(dsn) as conn:
        with conn.transaction(), conn.cursor() as cur:
            # Room to sort index builds and aggregate order totals in memory.
            cur.execute("SET LOCAL work_mem = '64MB'")
            cur.execute("SET LOCAL maintenance_work_mem = '256MB'")
            _create_tables(cur)
            counts = populate(conn, rows, seed, analyze_after=False)
            _create_indexes_and_keys(cur)
        conn.autocommit = True
        analyze(conn)
    return counts


def rows_for_size(target_bytes: int) -> int:
    """The `rows` that makes build() produce a database of about `target_bytes`.

    Lets the demo and benchmarks ask for "a 1 GB database" rather than a row
    count; accurate to a few percent (see BYTES_PER_ROW for the measurement).
    """
    if target_bytes <= EMPTY_DATABASE_BYTES:
        return 0
    return round((target_bytes - EMPTY_DATABASE_BYTES) / BYTES_PER_ROW)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; the DSN is never echoed because it may carry a password."""
    parser = argparse.ArgumentParser(
        prog="python -m demo.sample_data",
        description="Build the FraiseQL-shaped sample database into an existing, empty database.",
    )
    parser.add_argument("dsn", metavar="DSN", help="libpq URI or key=value DSN of the target database")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, default=100_000, help="total rows across all tables")
    size.add_argument("--size-mb", type=float, help="aim for about this on-disk size instead")
    parser.add_argument("--seed", type=int, default=7, help="same seed, same data")
    args = parser.parse_args(argv)
    rows = rows_for_size(int(args.size_mb * 1024 * 1024)) if args.size_mb is not None else args.rows
    if rows < 0:
        parser.error("--rows must be >= 0")
    try:
        counts = build(args.dsn, rows=rows, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"error: {type(exc).__name__}: {exc}".rstrip(), file=sys.stderr)
        return 1
    width = max(map(len, counts))
    for table, count in counts.items():
        print(f"{table:<{width}}  {count:>12,}")
    print(f"{'total':<{width}}  {sum(counts.values()):>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
