"""The README's reference tables name exactly what the code has: every setting, every metric."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from service.observability.metrics import Metrics
from service.settings import Settings
from tests.conftest import ROOT


def table_names(section: str, pattern: str) -> set[str]:
    """The names in the first column of the tables of README section `## <section>`."""
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = (row.split("|")[1] for row in body.splitlines() if row.startswith("| `"))
    return {name for first in rows for name in re.findall(pattern, first)}


def test_the_settings_table_has_every_setting_as_its_variable() -> None:
    expected = {f"LUNGSERVE_{field.upper()}" for field in Settings.model_fields}
    assert table_names("Settings", r"`(LUNGSERVE_\w+)`") == expected


def test_the_metrics_table_has_every_metric() -> None:
    registry = CollectorRegistry()
    Metrics(registry, max_batch_size=4)
    families = [f for f in registry.collect() if f.name.startswith("lungserve_")]  # not process_*
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert table_names("Observability", r"`(lungserve_\w+)`") == exposed


def test_the_settings_table_states_the_defaults_of_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    body = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for row in body.splitlines():
        if not row.startswith("| `"):
            continue
        names, defaults = (cell.strip() for cell in row.split("|")[1:3])
        for name, default in zip(re.findall(r"`LUNGSERVE_(\w+)`", names), defaults.split(" / "), strict=False):
            field = Settings.model_fields[name.lower()]
            literal = re.match(r"`([^`$]+)`", default)
            if field.default_factory is not None or literal is None:
                continue  # computed (CPU count, cache home) or said in words ("unset: ...")
            code = field.default
            if isinstance(code, bool):
                assert literal.group(1) == str(code).lower(), name
            elif isinstance(code, int | float):
                assert float(literal.group(1)) == code, name
            else:
                assert literal.group(1) == str(code), name
            checked += 1
    assert checked >= 30
