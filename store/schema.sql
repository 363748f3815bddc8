-- branchlens store schema. The number below is the contract version: bump it on any change.
-- schema_version: 1
--
-- {dim} is replaced by the model's hidden size when the store is created: one store holds latents of
-- one width, so `vec` can be a fixed-size ARRAY and array_cosine_similarity & co. work on it.

CREATE TABLE meta (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

CREATE TABLE runs (
    run_id        VARCHAR PRIMARY KEY,
    model         VARCHAR NOT NULL,      -- model as given: alias, hub id, directory or GGUF path
    created_at    TIMESTAMP NOT NULL,
    config        JSON NOT NULL,         -- the full resolved run config
    config_hash   VARCHAR NOT NULL,      -- hash of the settings that decide the output (resume key)
    status        VARCHAR NOT NULL,      -- 'running' | 'complete'
    completed_at  TIMESTAMP,
    n_layers      INTEGER NOT NULL,      -- transformer blocks; layer 0 = embeddings, n_layers = last block
    d_model       INTEGER NOT NULL,
    pe_type       VARCHAR NOT NULL,      -- 'learned_absolute' | 'rope' | 'alibi' | 'unknown'
    device        VARCHAR NOT NULL,
    dtype         VARCHAR NOT NULL,
    branchlens_version VARCHAR NOT NULL
);

CREATE TABLE prompts (
    run_id     VARCHAR NOT NULL,
    prompt_id  INTEGER NOT NULL,         -- index in the run's prompt list
    text       VARCHAR NOT NULL,
    n_tokens   INTEGER NOT NULL,         -- prompt length in tokens, BOS included
    PRIMARY KEY (run_id, prompt_id)
);

CREATE TABLE branches (
    run_id            VARCHAR NOT NULL,
    branch_id         INTEGER NOT NULL,  -- unique within the run
    prompt_id         INTEGER NOT NULL,
    parent_branch_id  INTEGER,           -- NULL for the root (the prompt itself)
    fork_position     INTEGER NOT NULL,  -- first position this branch stores; shares < fork_position with parent
    depth             SMALLINT NOT NULL, -- 0 prompt, 1 sample, 2+ forks
    kind              VARCHAR NOT NULL,  -- 'prompt' | 'sample' | 'fork'
    path              VARCHAR NOT NULL,  -- readable address in the tree, e.g. 's1.f0'
    n_tokens          INTEGER NOT NULL,  -- tokens stored for this branch (its own segment)
    end_position      INTEGER NOT NULL,  -- last position of the branch
    ended_with_eos    BOOLEAN NOT NULL,
    PRIMARY KEY (run_id, branch_id)
);

CREATE TABLE tokens (
    run_id      VARCHAR NOT NULL,
    branch_id   INTEGER NOT NULL,
    position    INTEGER NOT NULL,        -- absolute index in the sequence, 0 = first token (BOS if any)
    token_id    INTEGER NOT NULL,
    token_text  VARCHAR NOT NULL,        -- the token decoded on its own
    logprob     FLOAT,                   -- log p(token | prefix) under the model at temperature 1; NULL at 0
    entropy     FLOAT,                   -- entropy (nats) of that next-token distribution; NULL at 0
    is_prompt   BOOLEAN NOT NULL
);

CREATE TABLE latents (
    run_id     VARCHAR NOT NULL,
    branch_id  INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    layer      SMALLINT NOT NULL,        -- 0 = embedding output, i = output of block i (HF hidden_states[i])
    variant    VARCHAR NOT NULL,         -- 'normal' | 'zero_pe'
    vec        FLOAT[{dim}] NOT NULL
);

-- Every (branch, ancestor) pair with the positions the ancestor contributes: a branch owns all its
-- stored positions, each ancestor the positions below the fork of the lineage member just under it.
CREATE VIEW branch_lineage AS
WITH RECURSIVE lineage(run_id, branch_id, source_branch_id, below_position) AS (
    SELECT run_id, branch_id, branch_id, CAST(NULL AS INTEGER) FROM branches
    UNION ALL
    SELECT l.run_id, l.branch_id, b.parent_branch_id, b.fork_position
    FROM lineage l
    JOIN branches b ON b.run_id = l.run_id AND b.branch_id = l.source_branch_id
    WHERE b.parent_branch_id IS NOT NULL
)
SELECT * FROM lineage;

-- Each branch's full token sequence, shared prefix included; source_branch_id says who stores the row.
CREATE VIEW branch_tokens AS
SELECT l.run_id, l.branch_id, t.position, t.token_id, t.token_text, t.logprob, t.entropy, t.is_prompt,
       l.source_branch_id
FROM branch_lineage l
JOIN tokens t ON t.run_id = l.run_id AND t.branch_id = l.source_branch_id
WHERE l.below_position IS NULL OR t.position < l.below_position;

-- Each branch's latents over its full sequence, shared prefix included.
CREATE VIEW branch_latents AS
SELECT l.run_id, l.branch_id, x.position, x.layer, x.variant, x.vec, l.source_branch_id
FROM branch_lineage l
JOIN latents x ON x.run_id = l.run_id AND x.branch_id = l.source_branch_id
WHERE l.below_position IS NULL OR x.position < l.below_position;
