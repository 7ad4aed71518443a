#!/usr/bin/env bash
# The main job: materialize the whole OPSDL asset graph headless on the embedded default
# (SmolLM2-135M-Instruct), with the Dagster instance and the lineage DuckDB under var/.
#   scripts/pipeline.sh                        # configs/pipeline.yaml
#   scripts/pipeline.sh my-run-config.yaml     # another run config (same schema as the Launchpad)
# Afterwards:
#   DAGSTER_HOME=$PWD/var/dagster_home .venv/bin/dagster dev -w workspace.yaml    # the web UI
#   .venv/bin/opsdl lineage sql "SELECT * FROM v_scores"                           # lineage in SQL
set -euo pipefail
cd "$(dirname "$0")/.."
export OPSDL_HOME="${OPSDL_HOME:-$PWD/var}"
export DAGSTER_HOME="${DAGSTER_HOME:-$OPSDL_HOME/dagster_home}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"
start=$(date +%s)
.venv/bin/dagster job execute -m pipelines.definitions -j opsdl_full_pipeline -c "${1:-configs/pipeline.yaml}"
report="$OPSDL_HOME/artifacts/report/report.md"
echo
cat "$report"
echo
echo "[opsdl] pipeline finished in $(( $(date +%s) - start )) s"
echo "[opsdl] report:     $report"
echo "[opsdl] lineage DB: $OPSDL_HOME/lineage.duckdb"
echo "[opsdl] web UI:     DAGSTER_HOME=$DAGSTER_HOME .venv/bin/dagster dev -w workspace.yaml  (http://127.0.0.1:3000)"
echo "[opsdl] SQL:        .venv/bin/opsdl lineage --db $OPSDL_HOME/lineage.duckdb sql \"SELECT * FROM v_scores\""
