-- Discovery state shared by every server instance on this database.
-- Kept to SQL that PostgreSQL-compatible distributed engines also run: plain tables,
-- primary keys and unique constraints, INSERT ... ON CONFLICT ... DO UPDATE ... WHERE,
-- data-modifying WITH, BIGSERIAL. No triggers, stored procedures, advisory locks or
-- server-side time: every timestamp comes from the instances (milliseconds since the
-- Unix epoch).

-- Name claims: one row per node; the unique name is what makes names first come,
-- first served across instances.
CREATE TABLE IF NOT EXISTS p2p_claims (
    node_id      BYTEA  PRIMARY KEY,
    name         TEXT   NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    -- signature (64 bytes) || the signed record bytes
    claim        BYTEA  NOT NULL,
    CONSTRAINT p2p_claims_name_unique UNIQUE (name)
);

-- Presence: the last record or withdrawal seen from each node. A row with a record and
-- expires_at_ms in the future is live; any other row is a tombstone that refuses older
-- records until forget_at_ms.
CREATE TABLE IF NOT EXISTS p2p_presence (
    node_id       BYTEA  PRIMARY KEY,
    timestamp_ms  BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    forget_at_ms  BIGINT NOT NULL,
    -- signature (64 bytes) || the signed record bytes; NULL after a withdrawal
    record        BYTEA,
    observed_ip   TEXT
);
CREATE INDEX IF NOT EXISTS p2p_presence_forget ON p2p_presence (forget_at_ms);

-- Mailboxes: envelopes by recipient, and a count per recipient that every deposit
-- takes a slot from (a conditional upsert), so the bound holds across instances.
CREATE TABLE IF NOT EXISTS p2p_mailbox (
    id       BIGSERIAL PRIMARY KEY,
    node_id  BYTEA     NOT NULL,
    envelope BYTEA     NOT NULL
);
CREATE INDEX IF NOT EXISTS p2p_mailbox_node ON p2p_mailbox (node_id, id);

CREATE TABLE IF NOT EXISTS p2p_mailbox_counts (
    node_id BYTEA   PRIMARY KEY,
    count   INTEGER NOT NULL
);

-- Signatures of signed mailbox requests, each accepted once, until their timestamp has
-- left the time window.
CREATE TABLE IF NOT EXISTS p2p_request_signatures (
    signature    BYTEA  PRIMARY KEY,
    forget_at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS p2p_request_signatures_forget ON p2p_request_signatures (forget_at_ms);
