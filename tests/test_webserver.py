"""The real Dagster webserver, loading the code location through workspace.yaml, seen by its
GraphQL API and by headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from assets import ALL_ASSETS, ALL_CHECKS, OpsdlResource

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["eval_sets", "curated_prompts", "quarantined_rows", "teacher_contexts", "base_rollouts", "opsdl_model",
          "evaluation", "long_context_eval", "report", "method_comparison"]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = json.loads(r.read())
    assert "errors" not in body, body
    return body["data"]


@pytest.fixture(scope="module")
def webserver(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("web")
    dagster_home = home / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "OPSDL_HOME": str(home / "opsdl"),
           "OPSDL_MODEL": str(tiny_model_dir)}
    # materialize the curation stage into this instance, so the UI has something to show
    instance = dg.DagsterInstance.local_temp(str(dagster_home))
    res = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], instance=instance, selection=["eval_sets", "curated_prompts", "quarantined_rows"],
                         resources={"opsdl": OpsdlResource(home=str(home / "opsdl"), model=str(tiny_model_dir)),
                                    "pipes_subprocess_client": dg.PipesSubprocessClient()},
                         run_config={"ops": {
                             "eval_sets": {"config": {"lengths": [160], "n": 2, "in_template_n": 0,
                                                      "n_distractors": [2, 3]}},
                             "curated_prompts": {"config": {"size": 3, "context_tokens": 160,
                                                            "n_distractors": [2, 3]}}}})
    assert res.success
    port = _free_port()
    log = open(home / "webserver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml", "-h", "127.0.0.1",
                             "-p", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                data = _graphql(port, "{ workspaceOrError { ... on Workspace { locationEntries { name "
                                      "locationOrLoadError { __typename } } } } }")
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["locationOrLoadError"]:
                    break
            except (OSError, AssertionError):
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"webserver did not come up: {(home / 'webserver.log').read_text()[-3000:]}")
            time.sleep(1)
        yield port, home, entries
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_graphql_lists_every_asset_and_latest_materializations(webserver):
    port, _, entries = webserver
    assert entries[0]["name"] == "opsdl" and entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation"
    data = _graphql(port, "{ assetNodes { assetKey { path } groupName } "
                          "assetsLatestInfo(assetKeys: [{path: [\"eval_sets\"]}, {path: [\"curated_prompts\"]}, "
                          "{path: [\"report\"]}]) { assetKey { path } latestMaterialization { runId timestamp } } }")
    nodes = {n["assetKey"]["path"][0]: n["groupName"] for n in data["assetNodes"]}
    assert set(STAGES) <= set(nodes), nodes
    assert nodes["opsdl_model"] == "training" and nodes["eval_sets"] == "curation"
    assert nodes["method_comparison"] == "experiment"
    latest = {i["assetKey"]["path"][0]: i["latestMaterialization"] for i in data["assetsLatestInfo"]}
    assert latest["eval_sets"] and latest["curated_prompts"] and latest["report"] is None


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_headless_chromium_shows_every_stage(webserver):
    port, home, _ = webserver
    browser = _chromium()
    if browser is None:
        if os.environ.get("OPSDL_REQUIRE_BROWSER"):
            pytest.fail("OPSDL_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); CI installs it")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--metrics-recording-only", "--no-default-browser-check",
             "--disable-domain-reliability", "--disable-breakpad", "--disable-client-side-phishing-detection",
             f"--user-data-dir={home / 'chrome-profile'}", "--window-size=1600,1000", "--virtual-time-budget=20000"]
    url = f"http://127.0.0.1:{port}/assets"
    shot = home / "asset-graph.png"
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    subprocess.run([browser, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000
    missing = [s for s in STAGES if s not in dom.stdout]
    assert not missing, f"not on the page: {missing}"
    out = os.environ.get("OPSDL_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / "asset-graph.png")
