"""prefect.yaml is the one list of deployments. This module reads it for `runbooks serve`
and `runbooks run`, refuses a bad entry before anything is registered (naming the
deployment and the reason), and shapes each parameter form for a person: target names
as dropdowns of the configured targets, optional values as plain fields."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tasks.errors import ConfigError

PROJECT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT / "prefect.yaml"

# Flow parameters that name a configured target: the form offers the configured names.
TARGET_PARAMETERS = {"database": "databases", "service": "services", "store": "stores"}


# Deployments with this tag need the database's [pitr] section; without it their
# schedules are registered inactive (see dormant_reason).
PITR_TAG = "pitr"

# Settings of an entry that only `prefect deploy` and its workers use.
WORKER_ONLY = {"work_pool", "pull", "build", "push", "version"}


class DeploymentSpec(BaseModel):
    """One entry of prefect.yaml, as far as we read it."""

    name: str
    entrypoint: str
    description: str | None = None
    parameters: dict[str, Any] = {}
    schedules: list[dict[str, Any]] = []
    concurrency_limit: int | dict[str, Any] | None = None
    tags: list[str] = []

    @property
    def flow_name(self) -> str:
        return load_flow(self).name

    @property
    def full_name(self) -> str:
        """`flow-name/deployment-name`, as Prefect names it."""
        return f"{self.flow_name}/{self.name}"


def read_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """Every deployment of prefect.yaml; a malformed entry is a ConfigError naming it."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path.name}: cannot read: {str(exc).splitlines()[0]}") from None
    out = []
    for i, entry in enumerate(data.get("deployments") or []):
        label = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(entry, dict):
            unserved = sorted(set(entry) - set(DeploymentSpec.model_fields) - WORKER_ONLY)
            if unserved:
                raise ConfigError(f"{path.name}: deployment {label}: {unserved[0]}: not a setting "
                                  f"runbooks serve knows (it serves: {', '.join(DeploymentSpec.model_fields)})")
        try:
            out.append(DeploymentSpec.model_validate(
                {k: v for k, v in entry.items() if k in DeploymentSpec.model_fields}))
        except (ValidationError, AttributeError) as exc:
            raise ConfigError(f"{path.name}: deployment {label or f'#{i + 1}'}: {_first_error(exc)}") from None
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path.name}: deployment names used twice: {', '.join(dupes)}")
    return out


def find_spec(name: str, path: Path = PREFECT_YAML) -> DeploymentSpec:
    """The deployment `name` (or `flow-name/name`); the error lists the known names."""
    specs = read_specs(path)
    for spec in specs:
        if name == spec.name or ("/" in name and name == spec.full_name):
            return spec
    raise ConfigError(f"unknown deployment {name!r} (known: {', '.join(s.name for s in specs)})")


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        return f"{loc}: {e['msg']}" if loc else e["msg"]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


_FLOWS: dict[str, Any] = {}


def load_flow(spec: DeploymentSpec) -> Any:
    """The flow object of the entry point, or a ConfigError that says why not."""
    if spec.entrypoint in _FLOWS:
        return _FLOWS[spec.entrypoint]
    from prefect.flows import Flow, load_flow_from_entrypoint

    file, _, func = spec.entrypoint.partition(":")
    if not func or not (PROJECT / file).is_file():
        raise ConfigError(f"deployment {spec.name}: entrypoint {spec.entrypoint!r}: no such file "
                          f"(expected path/to/module.py:flow_function, relative to {PROJECT})")
    try:
        flow = load_flow_from_entrypoint(f"{PROJECT / file}:{func}")
    except Exception as exc:  # noqa: BLE001 - any import failure is the entry's fault
        raise ConfigError(f"deployment {spec.name}: entrypoint {spec.entrypoint!r}: "
                          f"{type(exc).__name__}: {_first_error(exc)}") from None
    if not isinstance(flow, Flow):
        raise ConfigError(f"deployment {spec.name}: entrypoint {spec.entrypoint!r} is not a flow")
    _FLOWS[spec.entrypoint] = flow
    return flow


def schedules(spec: DeploymentSpec) -> list[Any]:
    """The entry's schedules, parsed exactly as `prefect deploy` parses them."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    out = []
    for i, raw in enumerate(spec.schedules):
        try:
            out.append(DeploymentScheduleCreate(**_schedule_config_to_deployment_schedule(raw)))
        except (ValueError, TypeError) as exc:
            shown = {k: v for k, v in raw.items() if k in ("cron", "interval", "rrule", "timezone")}
            raise ConfigError(f"deployment {spec.name}: schedule {i + 1} {shown}: {_first_error(exc)}") from None
    return out


def check_parameters(spec: DeploymentSpec, flow: Any, values: dict[str, Any], where: str) -> None:
    """Names and types of `values` against the flow's signature, before any run exists."""
    check_against_schema(f"deployment {spec.name}: {where}", flow.parameters.model_dump_for_openapi(), values)


def check_against_schema(label: str, schema: dict[str, Any], params: dict[str, Any]) -> None:
    """Unknown names, wrong types and values outside a dropdown's choices: one line each."""
    from prefect.utilities.schema_tools import validate

    props = schema.get("properties", {})
    for key in params:
        if key not in props:
            raise ConfigError(f"{label}: unknown parameter {key!r} (parameters: {', '.join(props) or 'none'})")
    for key, value in params.items():
        errors = validate({key: value}, {"type": "object", "properties": {key: props[key]},
                                         "definitions": schema.get("definitions", {})},
                          ignore_required=True)
        if errors:
            raise ConfigError(f"{label}: parameter {key!r}: {json.dumps(value)} is not valid: "
                              f"{errors[0].message}")


def form_schema(schema: dict[str, Any], targets: dict[str, list[str]]) -> dict[str, Any]:
    """The parameter form as a person should see it: `X | None` as a plain optional X
    (Prefect's UI shows a type switch for it, and rejects an empty field whose default
    is null), and target parameters as dropdowns of the configured names."""
    schema = copy.deepcopy(schema)
    for name, prop in schema.get("properties", {}).items():
        variants = prop.get("anyOf")
        if variants:
            real = [v for v in variants if v.get("type") != "null"]
            if len(real) == 1 and len(real) < len(variants):
                prop.pop("anyOf")
                prop.update(real[0])
                if prop.get("default", "") is None:
                    prop.pop("default")  # left empty, the field is left out: the flow's None
        kind = TARGET_PARAMETERS.get(name)
        if kind and targets.get(kind) and prop.get("type") == "string":
            prop["enum"] = sorted(targets[kind])
    return schema


def dormant_reason(spec: DeploymentSpec, targets: dict[str, list[str]]) -> str | None:
    """Why the entry's schedules are registered inactive, if they are: a PITR runbook for
    a database without a [pitr] section would fail on every firing."""
    if PITR_TAG not in spec.tags or not spec.schedules:
        return None
    database = spec.parameters.get("database")
    if database in targets.get("pitr", []):
        return None
    return f"database {database!r} has no [databases.{database}.pitr] section"


def build_deployments(specs: list[DeploymentSpec], targets: dict[str, list[str]]) -> list[Any]:
    """A RunnerDeployment for every entry, with all its settings; any bad entry stops
    everything (a half-served prefect.yaml would hide the broken one)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    out = []
    for spec in specs:
        flow = load_flow(spec)
        check_parameters(spec, flow, spec.parameters, "parameters")
        for i, raw in enumerate(spec.schedules):
            check_parameters(spec, flow, raw.get("parameters") or {}, f"schedule {i + 1} parameters")
        limit = spec.concurrency_limit
        if isinstance(limit, dict):
            try:
                limit = ConcurrencyLimitConfig(**limit)
            except (ValidationError, TypeError) as exc:
                raise ConfigError(f"deployment {spec.name}: concurrency_limit: {_first_error(exc)}") from None
        planned = schedules(spec)
        if dormant_reason(spec, targets):
            planned = [s.model_copy(update={"active": False}) for s in planned]
        deployment = flow.to_deployment(
            name=spec.name, description=spec.description, tags=spec.tags,
            parameters=spec.parameters, schedules=planned, concurrency_limit=limit,
            paused=False)  # a restart of `serve` brings back the schedules its stop paused
        shaped = form_schema(deployment._parameter_openapi_schema.model_dump(), targets)
        deployment._parameter_openapi_schema = type(deployment._parameter_openapi_schema)(**shaped)
        out.append(deployment)
    return out
