"""Settings: loading, environment overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.errors import ConfigError
from tasks.postgres import mask_dsn
from tasks.storage import LocalStoreConfig, S3StoreConfig

GOOD = """
[databases.orders]
dsn = "postgresql://app:hunter2-secret@127.0.0.1:5432/orders"
store = "primary"

[stores.primary]
kind = "local"
path = "backups"
replica = "dr"

[stores.dr]
kind = "s3"
bucket = "dr-backups"
region = "eu-west-1"
sse_kms_key_id = "alias/backups"
"""


def test_loads_named_targets_with_relative_paths_resolved(write_config):
    path = write_config(GOOD)
    s = load_settings()
    db = s.database("orders")
    assert db.dbname == "orders"
    assert isinstance(s.store("primary"), LocalStoreConfig)
    assert s.store("primary").path == path.parent / "backups"
    dr = s.store("dr")
    assert isinstance(dr, S3StoreConfig) and dr.sse_kms_key_id == "alias/backups"
    assert "hunter2-secret" not in repr(s) and "hunter2-secret" not in str(s.model_dump())


def test_environment_overrides_the_file(write_config, monkeypatch):
    write_config(GOOD)
    monkeypatch.setenv("RUNBOOKS_DATABASES__ORDERS__JOBS", "4")
    monkeypatch.setenv("RUNBOOKS_NOTIFY__SLACK_CHANNEL", "#dr")
    s = load_settings()
    assert s.database("orders").config.jobs == 4
    assert s.database("orders").config.store == "primary"  # the rest of the file still applies
    assert s.notify.slack_channel == "#dr"


def test_unknown_database_lists_the_known_ones(write_config):
    write_config(GOOD)
    with pytest.raises(ConfigError, match=r"unknown database 'ordrs' \(known: orders\)"):
        load_settings().database("ordrs")


def test_missing_file_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNBOOKS_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml not found"):
        load_settings()


@pytest.mark.parametrize("text, key, expected", [
    (GOOD.replace('store = "primary"', 'store = "primary"\njobs = "many"'), "databases.orders.jobs",
     "integer"),
    (GOOD.replace('kind = "s3"', 'kind = "ftp"'), "stores.dr", 'kind = "local" or "s3"'),
    (GOOD.replace('bucket = "dr-backups"', 'bucket = "x"'), "stores.dr.s3.bucket", "at least 3"),
    (GOOD.replace('replica = "dr"', 'replica = "elsewhere"'), "stores.primary.replica", "no store named"),
    (GOOD.replace('[stores.primary]', '[stores.primary]\ncolour = "red"'), "stores.primary.local.colour",
     "Extra inputs"),
    (GOOD.replace('dsn = "postgresql://app:hunter2-secret@127.0.0.1:5432/orders"', ''),
     "databases.orders.dsn", "Field required"),
    (GOOD + '\n[prometheus]\nurl = "localhost:9090"\n', "prometheus.url", "must start with http"),
    (GOOD + '\n[prometheus]\nurl = "http://127.0.0.1:9090"\nuser = "x"\n', "prometheus.user", "Extra inputs"),
])
def test_malformed_values_name_the_key(write_config, text, key, expected):
    write_config(text)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert key in str(err.value) and expected in str(err.value)
    assert "hunter2-secret" not in str(err.value)


def test_invalid_toml_is_named(write_config):
    write_config("[databases.orders\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings()


@pytest.mark.parametrize("dsn", ["postgresql://app:hunter2-secret@db:5432/orders",
                                 "host=db user=app password=hunter2-secret dbname=orders"])
def test_mask_dsn_hides_the_password(dsn):
    masked = mask_dsn(dsn)
    assert "hunter2-secret" not in masked and "***" in masked and "orders" in masked


def test_malformed_dsn_is_rejected_without_showing_it(write_config):
    write_config(GOOD.replace('"postgresql://app:hunter2-secret@127.0.0.1:5432/orders"',
                              '"host=db password=hunter2 secret dbname=orders"'))
    with pytest.raises(ConfigError, match="databases.orders.dsn: not a valid libpq DSN") as err:
        load_settings()
    assert "hunter2" not in str(err.value)


def test_mask_dsn_never_echoes_what_it_cannot_parse():
    assert mask_dsn("host=db password=se cret") == "<unparsable DSN>"
    assert "s3cret" not in mask_dsn("host=db sslpassword=s3cret dbname=x")


def test_work_dir_and_home_paths(write_config, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_config('work_dir = "spool"\n' + GOOD.replace('path = "backups"', 'path = "~/bk"'))
    s = load_settings()
    assert s.work_dir == path.parent / "spool"
    assert s.store("primary").path == tmp_path / "home" / "bk"


def test_error_rate_needs_prometheus_and_uses_the_job(write_config):
    service = """
[services.api]
base_url = "http://127.0.0.1:8000"
controller = { kind = "systemd", unit = "api.service" }
"""
    write_config(GOOD + service)
    assert load_settings().error_rate("api") is None
    write_config(GOOD + service + 'prometheus_job = "fraiseql"\nerror_rate_threshold = 0.005\n'
                 + '[prometheus]\nurl = "http://127.0.0.1:9090/"\n')
    errors = load_settings().error_rate("api")
    assert errors.prom.url == "http://127.0.0.1:9090" and errors.threshold == 0.005
    assert 'job="fraiseql",status=~"5.."' in errors.promql and "$job" not in errors.promql
    write_config(GOOD + service + "log_error_pattern = '(unclosed'\n")
    with pytest.raises(ConfigError, match="services.api.log_error_pattern: not a valid regular expression"):
        load_settings()
    write_config(GOOD + service + "error_rate_threshold = 5\n")
    with pytest.raises(ConfigError, match="services.api.error_rate_threshold: Input should be less than or equal to 1"):
        load_settings()


@pytest.mark.parametrize("section, name", [("databases", "../evil"), ("databases", "or'ders"),
                                           ("databases", "my db"), ("stores", "Primary"),
                                           ("services", "-api"), ("databases", "x" * 49)])
def test_target_names_are_checked_when_the_file_loads(write_config, section, name):
    body = {"databases": 'dsn = "postgresql://u@h/db"\nstore = "s"\n[stores.s]\nkind = "local"\npath = "b"',
            "stores": 'kind = "local"\npath = "b"',
            "services": 'base_url = "http://127.0.0.1:1"\ncontroller = { kind = "systemd", unit = "a.service" }'}
    write_config(f'[{section}."{name}"]\n{body[section]}\n')
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert f"{section}: {name!r} is not a valid target name (use lowercase letters" in str(err.value)


def test_ordinary_target_names_load(write_config):
    write_config('[databases.orders-eu_2]\ndsn = "postgresql://u@h/db"\n')
    assert list(load_settings().databases) == ["orders-eu_2"]
