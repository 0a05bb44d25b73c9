"""The README's reference tables name exactly what the code has: every setting, every metric."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from service.metrics import Metrics
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
