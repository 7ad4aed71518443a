"""The lineage store's DuckDB schema (``opsdl_core.lineage.store``): its tables (with the ALTERs that
migrate older files) and the views users query in SQL."""

SCHEMA_VERSION = 4

_TABLES = """
CREATE TABLE IF NOT EXISTS schema_info (version INTEGER NOT NULL);
-- which tables and views this file holds: a digest of this text (opening writes only when it differs)
CREATE TABLE IF NOT EXISTS schema_digest (digest VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    experiment_id VARCHAR PRIMARY KEY,
    name          VARCHAR NOT NULL,
    description   VARCHAR,
    created_at    TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id          VARCHAR PRIMARY KEY,   -- stable: derived from what the run is (asset, config, data)
    experiment_id   VARCHAR NOT NULL,
    kind            VARCHAR NOT NULL,      -- curate | teacher_context | rollout | train | eval | report
    name            VARCHAR,
    dagster_run_id  VARCHAR,
    asset_key       VARCHAR,
    partition_key   VARCHAR,
    config_hash     VARCHAR,
    code_version    VARCHAR,
    base_model      VARCHAR,
    base_model_hash VARCHAR,
    status          VARCHAR NOT NULL,      -- running | finished | failed
    started_at      TIMESTAMP,
    ended_at        TIMESTAMP,
    duration_s      DOUBLE,
    run_dir         VARCHAR,
    timings         JSON                   -- seconds per phase
);
CREATE TABLE IF NOT EXISTS params (
    run_id VARCHAR NOT NULL,
    key    VARCHAR NOT NULL,
    value  VARCHAR,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id    VARCHAR NOT NULL,
    key       VARCHAR NOT NULL,
    step      BIGINT NOT NULL,
    value     DOUBLE,
    timestamp TIMESTAMP,
    PRIMARY KEY (run_id, key, step)
);
CREATE TABLE IF NOT EXISTS datasets (
    digest     VARCHAR PRIMARY KEY,       -- content digest of the rows
    name       VARCHAR NOT NULL,
    kind       VARCHAR NOT NULL,          -- prompts | teacher_contexts | rollouts | eval | quarantine
    path       VARCHAR,
    n_rows     BIGINT,
    created_at TIMESTAMP NOT NULL,
    metadata   JSON
);
CREATE TABLE IF NOT EXISTS lineage_edges (
    src_type VARCHAR NOT NULL,            -- dataset | run | checkpoint | model
    src_id   VARCHAR NOT NULL,
    dst_type VARCHAR NOT NULL,
    dst_id   VARCHAR NOT NULL,
    relation VARCHAR NOT NULL,            -- input | output | evaluated | base_model
    run_id   VARCHAR,
    PRIMARY KEY (src_type, src_id, dst_type, dst_id, relation)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id VARCHAR PRIMARY KEY,    -- content hash of the files
    run_id        VARCHAR NOT NULL,
    step          BIGINT,
    kind          VARCHAR NOT NULL,       -- adapter | full | merged
    path          VARCHAR,
    created_at    TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS eval_scores (
    run_id          VARCHAR NOT NULL,     -- the evaluation run
    checkpoint_id   VARCHAR NOT NULL,     -- 'base:<model hash>' for the untrained model
    task            VARCHAR NOT NULL,
    context         VARCHAR NOT NULL,     -- long | short
    context_length  BIGINT NOT NULL,      -- target tokens of the prompts (0: not length-bucketed)
    metric          VARCHAR NOT NULL,
    value           DOUBLE,
    n               BIGINT,
    dataset_digest  VARCHAR,
    PRIMARY KEY (run_id, checkpoint_id, task, context, context_length, metric)
);
-- v2: where a score came from (schema v1 files gain these columns, NULL for their old rows)
ALTER TABLE eval_scores ADD COLUMN IF NOT EXISTS stderr DOUBLE;
ALTER TABLE eval_scores ADD COLUMN IF NOT EXISTS harness VARCHAR;           -- e.g. 'lm-eval 0.4.13', 'opsdl'
ALTER TABLE eval_scores ADD COLUMN IF NOT EXISTS task_config_hash VARCHAR;  -- hash of the task's resolved config
CREATE TABLE IF NOT EXISTS rollout_samples (
    run_id            VARCHAR NOT NULL,
    example_id        VARCHAR NOT NULL,
    sample_index      INTEGER NOT NULL,
    step              BIGINT NOT NULL,
    dataset_digest    VARCHAR,
    response          VARCHAR,
    n_tokens          INTEGER,
    finish_reason     VARCHAR,
    student_logprob   DOUBLE,
    teacher_logprob   DOUBLE,
    correct           BOOLEAN,
    PRIMARY KEY (run_id, example_id, sample_index, step)
);
-- v2: each sample's tokens with their student (long prompt) and teacher (short prompt) log-probs
ALTER TABLE rollout_samples ADD COLUMN IF NOT EXISTS token_ids INTEGER[];
ALTER TABLE rollout_samples ADD COLUMN IF NOT EXISTS tokens VARCHAR[];
ALTER TABLE rollout_samples ADD COLUMN IF NOT EXISTS student_token_logprobs DOUBLE[];
ALTER TABLE rollout_samples ADD COLUMN IF NOT EXISTS teacher_token_logprobs DOUBLE[];
-- v3: each question's answer behind a score, where the harness gives them (the experiment's suites)
CREATE TABLE IF NOT EXISTS eval_answers (
    run_id          VARCHAR NOT NULL,
    checkpoint_id   VARCHAR NOT NULL,
    task            VARCHAR NOT NULL,
    context         VARCHAR NOT NULL,
    context_length  BIGINT NOT NULL,
    metric          VARCHAR NOT NULL,
    example_id      VARCHAR NOT NULL,
    dataset_digest  VARCHAR,
    output          VARCHAR,
    correct         BOOLEAN NOT NULL,
    PRIMARY KEY (run_id, checkpoint_id, task, context, context_length, metric, example_id)
);
-- v4: how a wrong answer went wrong ('distractor': it names another fact's value; 'other'; NULL: right or unknown)
ALTER TABLE eval_answers ADD COLUMN IF NOT EXISTS error VARCHAR;
"""

_VIEWS = """
CREATE OR REPLACE VIEW v_checkpoint_provenance AS
SELECT c.checkpoint_id, c.kind AS checkpoint_kind, c.step, c.path AS checkpoint_path,
       r.run_id, r.experiment_id, r.dagster_run_id, r.config_hash, r.code_version,
       r.base_model, r.base_model_hash,
       (SELECT string_agg(e.src_id, ',' ORDER BY e.src_id) FROM lineage_edges e
         WHERE e.dst_type = 'run' AND e.dst_id = r.run_id AND e.src_type = 'dataset') AS input_datasets,
       (SELECT p.value FROM params p WHERE p.run_id = r.run_id AND p.key = 'data.teacher_context')
           AS teacher_context,
       (SELECT p.value FROM params p WHERE p.run_id = r.run_id AND p.key = 'data.short_budget_tokens')
           AS short_budget_tokens,
       (SELECT p.value FROM params p WHERE p.run_id = r.run_id AND p.key = 'loss.kind') AS loss_kind,
       (SELECT p.value FROM params p WHERE p.run_id = r.run_id AND p.key = 'train.teacher') AS teacher_kind
FROM checkpoints c JOIN runs r USING (run_id);

CREATE OR REPLACE VIEW v_scores AS
SELECT s.task, s.context, s.context_length, s.metric, s.value, s.stderr, s.n,
       s.harness, s.task_config_hash, s.checkpoint_id, s.run_id AS eval_run_id, s.dataset_digest AS eval_dataset,
       c.run_id AS train_run_id,
       (SELECT string_agg(e.src_id, ',' ORDER BY e.src_id) FROM lineage_edges e
         WHERE e.dst_type = 'run' AND e.dst_id = c.run_id AND e.src_type = 'dataset') AS train_datasets
FROM eval_scores s LEFT JOIN checkpoints c USING (checkpoint_id);

-- one row per response token: where along the answer does the long-context student depart from
-- its short-context teacher? (gap = student - teacher log-prob; > 0: the student is surer)
CREATE OR REPLACE VIEW v_token_gaps AS
SELECT run_id, example_id, sample_index, step, correct,
       generate_subscripts(student_token_logprobs, 1) - 1 AS position,
       unnest(tokens) AS token,
       unnest(student_token_logprobs) AS student_logprob,
       unnest(teacher_token_logprobs) AS teacher_logprob,
       unnest(student_token_logprobs) - unnest(teacher_token_logprobs) AS gap
FROM rollout_samples WHERE student_token_logprobs IS NOT NULL;

CREATE OR REPLACE VIEW v_gap_by_position AS
SELECT run_id, step, position, avg(gap) AS mean_gap, avg(abs(gap)) AS mean_abs_gap, count(*) AS n
FROM v_token_gaps GROUP BY run_id, step, position;

-- the experiment's scores (opsdl_core.experiment): each with its method, seed, step and prompts
-- seen (params of the evaluation run), the checkpoint's training run, config hash and input data
CREATE OR REPLACE VIEW v_method_scores AS
SELECT x.name AS experiment,
       (SELECT p.value FROM params p WHERE p.run_id = s.run_id AND p.key = 'method') AS method,
       TRY_CAST((SELECT p.value FROM params p WHERE p.run_id = s.run_id AND p.key = 'seed') AS INTEGER) AS seed,
       TRY_CAST((SELECT p.value FROM params p WHERE p.run_id = s.run_id AND p.key = 'step') AS INTEGER) AS step,
       TRY_CAST((SELECT p.value FROM params p WHERE p.run_id = s.run_id AND p.key = 'prompts_seen') AS INTEGER)
           AS prompts_seen,
       s.task, s.context, s.context_length, s.metric, s.value, s.n, s.checkpoint_id,
       s.dataset_digest AS eval_dataset, s.run_id AS eval_run_id,
       c.run_id AS train_run_id, t.config_hash AS train_config_hash,
       (SELECT string_agg(e.src_id, ',' ORDER BY e.src_id) FROM lineage_edges e
         WHERE e.dst_type = 'run' AND e.dst_id = c.run_id AND e.src_type = 'dataset') AS train_datasets
FROM eval_scores s
JOIN runs r ON r.run_id = s.run_id
JOIN experiments x ON x.experiment_id = r.experiment_id
LEFT JOIN checkpoints c ON c.checkpoint_id = s.checkpoint_id
LEFT JOIN runs t ON t.run_id = c.run_id
WHERE EXISTS (SELECT 1 FROM params p WHERE p.run_id = s.run_id AND p.key = 'method');

CREATE OR REPLACE VIEW v_run_param_diffs AS
WITH pairs AS (
    SELECT a.run_id AS run_a, b.run_id AS run_b
    FROM runs a JOIN runs b ON a.kind = b.kind AND a.run_id < b.run_id
), diffs AS (
    SELECT p.run_a, p.run_b, coalesce(x.key, y.key) AS key, x.value AS value_a, y.value AS value_b
    FROM pairs p
    JOIN params x ON x.run_id = p.run_a
    FULL OUTER JOIN params y ON y.run_id = p.run_b AND y.key = x.key
    WHERE x.value IS DISTINCT FROM y.value
)
SELECT d.* FROM diffs d
JOIN (SELECT run_a, run_b FROM diffs GROUP BY run_a, run_b HAVING count(*) = 1) one
  USING (run_a, run_b);

CREATE OR REPLACE VIEW v_answer_changes AS
WITH a AS (
    SELECT m.experiment, m.method, m.seed, m.step, e.task, e.context, e.context_length, e.example_id,
           e.dataset_digest, e.output, e.correct, e.error
    FROM eval_answers e
    JOIN v_method_scores m ON m.eval_run_id = e.run_id AND m.checkpoint_id = e.checkpoint_id AND m.task = e.task
     AND m.context = e.context AND m.context_length = e.context_length AND m.metric = e.metric
)
SELECT t.experiment, t.method, t.seed, t.step, t.task, t.context, t.context_length, t.example_id,
       CASE WHEN t.correct AND NOT b.correct THEN 'gained' WHEN b.correct AND NOT t.correct THEN 'lost'
            ELSE 'same' END AS change,
       b.correct AS base_correct, t.correct, b.output AS base_output, t.output, b.error AS base_error, t.error
FROM a t
JOIN a b ON b.method = 'base' AND b.experiment = t.experiment AND b.task = t.task AND b.context = t.context
 AND b.context_length = t.context_length AND b.example_id = t.example_id
 AND b.dataset_digest IS NOT DISTINCT FROM t.dataset_digest
WHERE t.method <> 'base';

CREATE OR REPLACE VIEW v_metric_latest AS
SELECT run_id, key, arg_max(value, step) AS value, max(step) AS step
FROM metrics GROUP BY run_id, key;
"""
