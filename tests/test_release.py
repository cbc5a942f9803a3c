"""What an operator deploys beside the code: the pinned lock of runtime dependencies, and the
Prometheus alert rules.

The lock is checked without an index: against ``pyproject.toml`` and the metadata of what is
installed here (the test environment installs the runtime from the lock too, so it runs what a
deploy runs).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import requests
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version
from prometheus_client.parser import text_string_to_metric_families
from support.pipeline import DONE, Pipeline
from support.receiver import Reply

ROOT = Path(__file__).resolve().parent.parent
DEPLOYED_EXTRAS = ("s3", "redis", "amqp")  # what requirements.txt installs with the service


def pinned() -> dict[NormalizedName, Version]:
    """``requirements.lock``'s pins, by normalized name."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def applies(requirement: Requirement, extras: tuple[str, ...] = ("",)) -> bool:
    """Whether ``requirement`` holds here (Linux, this Python) for one of ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(default_environment() | {"extra": extra}) for extra in extras)


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in DEPLOYED_EXTRAS for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in listed]


def closure(roots: list[Requirement]) -> Iterator[tuple[str, Requirement]]:
    """Every requirement reachable from ``roots`` through the installed distributions' metadata,
    with who requires it (extras followed)."""
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    todo = [("pyproject.toml", r) for r in roots if applies(r)]
    while todo:
        by, requirement = todo.pop()
        yield by, requirement
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(requirement.name)
        extras = ("", *requirement.extras)
        todo += [(requirement.name, r) for r in map(Requirement, dist.requires or []) if applies(r, extras)]


def test_the_lock_pins_every_runtime_dependency_within_its_range_and_nothing_else() -> None:
    pins = pinned()
    needed: set[NormalizedName] = set()
    for by, requirement in closure(project_requirements()):
        name = canonicalize_name(requirement.name)
        needed.add(name)
        assert name in pins, f"{requirement.name} (required by {by}) is missing from requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {by}'s {requirement}: run make lock"
        )
    assert sorted(set(pins) - needed) == [], "requirements.lock pins what nothing requires: run make lock"


def test_the_tests_run_the_locked_versions() -> None:
    installed = {name: Version(metadata.version(name)) for name in pinned()}
    assert {name: str(v) for name, v in installed.items() if v != pinned()[name]} == {}


def test_the_paas_build_installs_the_service_from_the_lock() -> None:
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert lines == ["-c requirements.lock", f".[{','.join(DEPLOYED_EXTRAS)}]"]
    assert (ROOT / ".python-version").read_text().strip() == "3.11"


# -- alert rules -------------------------------------------------------------------------------

ALERTS = ROOT / "alerts.yaml"
METRIC_NAME = re.compile(r"\bcos_webhook_[a-z_]+\b")


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def headings() -> set[str]:
    """``<page>, <heading>`` for each heading of the docs' pages and README: what a runbook may name."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {
        f"{page.relative_to(ROOT)}, {heading}"
        for page in pages
        for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    }


def test_every_alert_rule_is_complete() -> None:
    found = rules()
    assert len(found) >= 6
    for rule in found:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict), rule
        assert labels["severity"] in {"page", "ticket"}, rule
        assert isinstance(annotations, dict), rule
        assert {"summary", "runbook"} <= set(annotations), rule
        assert str(annotations["runbook"]).split(":")[0] in headings(), rule
        assert METRIC_NAME.search(str(rule["expr"])), rule
    assert len({rule["alert"] for rule in found}) == len(found)


@pytest.mark.slow  # a job through the whole pipeline
def test_every_metric_an_alert_reads_is_in_a_real_scrape(pipeline: Pipeline) -> None:
    pipeline.http.reply(Reply(503), Reply(200))  # a failure gives the http sink's breaker its row
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    worker = pipeline.worker()
    try:
        assert pipeline.drain(worker, job_id, DONE) == "delivered"
    finally:
        worker.close()
    scraped = requests.get(f"{pipeline.receiver_url}/metrics", timeout=10).text
    served = {sample.name for family in text_string_to_metric_families(scraped) for sample in family.samples}
    read = {name for rule in rules() for name in METRIC_NAME.findall(str(rule["expr"]))}
    assert read - served == set()
