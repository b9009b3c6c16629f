"""The observability stack names only what the server exports.

Every metric name in every PromQL expression of ``docker/prometheus/rules.yml`` and of the
Grafana dashboard must appear in the exposition of a real server (``GET /metrics``, parsed with
``prometheus_client.parser``) or be a recording rule of rules.yml. With ``promtool`` installed,
the rules, their unit tests, the config and the dashboard's queries are also checked by it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import ROOT, start_server
from observability import (
    DASHBOARD_JSON,
    DOCKER,
    PROMETHEUS_YML,
    RULES_TEST_YML,
    RULES_YML,
    dashboard_queries,
    exported_names,
    grafana_to_promql,
    make_repository,
    parse_exposition,
    promql_metric_names,
    recording_rules,
    value,
)

from muxserve.model.packaging import family_config, write_config

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
DOC = ROOT / "docs" / "observability.md"


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """/metrics of a real server after traffic of every kind: successes, a bad request, and
    shadow sampling (so that every family has samples)."""
    root = tmp_path_factory.mktemp("queries")
    repo = make_repository(root / "repo", {"bert": 1, "mux2": 2}, configs={"mux2": {"baseline": "bert", "shadow_sample_rate": 1.0}})
    (repo / "fam").mkdir()
    write_config(repo / "fam" / "config.pbtxt", family_config("fam", ["bert", "mux2"], num_labels=2))
    srv = start_server(repo, root / "server.log", "--threads", "1", grpc=False)
    try:
        url = f"http://{srv.http_url}"
        for model in ("bert", "mux2", "fam"):
            r = httpx.post(f"{url}/v1/classify", json={"model": model, "inputs": ["a fine film", "a dull plot", "it is fun"]}, timeout=30)
            assert r.status_code == 200, r.text
        assert httpx.post(f"{url}/v1/classify", json={"model": "mux2", "inputs": []}, timeout=30).status_code == 400
        deadline = time.monotonic() + 30
        while True:
            samples, types = parse_exposition(httpx.get(f"{url}/metrics", timeout=10).text)
            if value(samples, "muxserve_shadow_texts_total", model="mux2") >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return samples, types
    finally:
        srv.stop()


def test_exposition_has_every_family(exposition):
    samples, types = exposition
    names = exported_names(samples)
    for family, kind in types.items():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
        missing = [family + s for s in suffixes if family + s not in names]
        assert not missing, f"family {family} ({kind}) has no samples {missing} after traffic of every kind"


def test_rules_name_only_exported_metrics(exposition):
    names = exported_names(exposition[0])
    rules = recording_rules()
    assert {"model:muxserve_inference_texts:rate1m", "model:muxserve_baseline_throughput:ratio_rate1m"} <= set(rules)
    for record, expr in rules.items():
        used = promql_metric_names(expr)
        assert used, f"{record}: no metric found in {expr!r}"
        unknown = used - names - set(rules)
        assert not unknown, f"rule {record} reads {sorted(unknown)}, which the server does not export"


def test_dashboard_names_only_exported_metrics(exposition):
    names = exported_names(exposition[0]) | set(recording_rules())
    queries = dashboard_queries()
    assert len(queries) >= 10
    for where, expr in queries:
        used = promql_metric_names(expr)
        assert used, f"{where}: no metric found in {expr!r}"
        unknown = used - names
        assert not unknown, f"dashboard {where} reads {sorted(unknown)}, which neither the server nor rules.yml provides"


def test_dashboard_has_the_panels_operators_need():
    import json

    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD_JSON.read_text())["panels"])
    for words in ("mux vs baseline", "ratio", "p50 / p99", "queue depth", "group fill", "texts per forward pass", "agreement", "errors by reason"):
        assert words in titles, f"no panel about {words!r} in: {titles}"


def test_dashboard_json_is_the_generator_output():
    spec = importlib.util.spec_from_file_location("make_dashboard", DOCKER / "grafana" / "make_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD_JSON.read_text() == module.render(), "run python docker/grafana/make_dashboard.py and commit the JSON"


def test_promql_name_extraction():
    expr = 'sum by (model, le) (rate(a_bucket{model=~"$model", le!="+Inf"}[$__rate_interval])) / on (model) group_left (baseline) max(b) * 1e3 > bool 0 or label_replace(c, "x", "$1", "y", "(.*)") offset 5m'
    assert promql_metric_names(expr) == {"a_bucket", "b", "c"}
    assert grafana_to_promql('x{model=~"$model"}[$__rate_interval]') == 'x{model=~".*"}[1m]'
    assert grafana_to_promql('label_replace(x{m="${model}"}, "a", "$1", "b", "(.*)")') == 'label_replace(x{m=".*"}, "a", "$1", "b", "(.*)")'


def test_every_exported_metric_is_documented(exposition):
    if not DOC.exists():
        pytest.skip("docs/observability.md not written")
    doc = DOC.read_text()
    for family, kind in exposition[1].items():
        name = family + "_total" if kind == "counter" else family
        assert f"`{name}`" in doc, f"{name} is exported but not in {DOC.relative_to(ROOT)}"


def test_compose_wires_the_stack_together():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"muxserve", "prometheus", "grafana"} <= set(services)
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "muxserve"]
    [target] = job["static_configs"][0]["targets"]
    assert target == "muxserve:8000", "Prometheus must scrape the compose service on the server's HTTP port"
    for rules in prom["rule_files"]:
        assert (PROMETHEUS_YML.parent / rules).exists()
    # every host path the compose file mounts exists
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).resolve().exists() or source.endswith("model_repository"), f"{name} mounts missing {source}"
    datasource = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    import json

    board = json.loads(DASHBOARD_JSON.read_text())
    uids = {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}


# ---------------------------------------------------------------------------- promtool


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_checks_rules_and_config():
    for args in (("check", "rules", str(RULES_YML)), ("check", "config", str(PROMETHEUS_YML))):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests():
    """Ratio join, error ratio, quantiles and agreement on synthetic series (rules_test.yml)."""
    result = promtool("test", "rules", str(RULES_TEST_YML))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    rules = [{"record": f"dashboard_query_{i}", "expr": grafana_to_promql(expr)} for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
