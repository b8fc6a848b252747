-- Written by tlsroll 0.1.0 (commit 1fb4745), the layout before schema migrations.
BEGIN TRANSACTION;
CREATE TABLE audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail  TEXT NOT NULL                -- JSON; never holds a secret
);
INSERT INTO "audit" VALUES(1,'2026-11-29T12:00:00+00:00','admin:root','token.created','abc123','{"expires_at": "2026-11-29T13:00:00+00:00", "uses": 2}');
INSERT INTO "audit" VALUES(2,'2026-11-29T12:00:00+00:00','node:node1','node.enrolled','node1','{"addresses": ["127.0.10.2"], "cert_fingerprint": "sha256:2222222222222222222222222222222222222222222222222222222222222222", "reenrolment": false, "token_id": "abc123"}');
INSERT INTO "audit" VALUES(3,'2026-11-29T12:00:00+00:00','node:node2','node.enrolled','node2','{"addresses": ["127.0.10.3"], "cert_fingerprint": "sha256:4444444444444444444444444444444444444444444444444444444444444444", "reenrolment": false, "token_id": "abc123"}');
INSERT INTO "audit" VALUES(4,'2026-11-29T12:00:00+00:00','admin:root','password.staged','auth/1','{}');
INSERT INTO "audit" VALUES(5,'2026-11-29T12:00:00+00:00','admin:root','rollout.created','r20261129-120000-ab12','{"change": "enable-tls", "epoch": 1, "order": ["node1", "node2"], "scope": "cluster", "state": "running"}');
INSERT INTO "audit" VALUES(6,'2026-11-29T12:00:00+00:00','engine','rollout.state','r20261129-120000-ab12','{"new": "halted", "old": "running", "reason": "halted: node2 rolled_back"}');
INSERT INTO "audit" VALUES(7,'2026-11-29T12:00:00+00:00','engine','node.state','r20261129-120000-ab12/node1','{"new": "done", "old": "pending", "reason": ""}');
INSERT INTO "audit" VALUES(8,'2026-11-29T12:00:00+00:00','engine','node.state','r20261129-120000-ab12/node2','{"new": "rolled_back", "old": "pending", "reason": "outside check failed: x; ROLLBACK FAILED, node needs attention: restart: no answer"}');
INSERT INTO "audit" VALUES(9,'2026-11-29T12:00:00+00:00','engine','password.applied','node1','{"version": 1}');
CREATE TABLE auth_versions (
    version    INTEGER PRIMARY KEY,
    verifier   TEXT NOT NULL,                    -- scrypt verifier JSON, never the password
    created_at TEXT NOT NULL,
    actor      TEXT NOT NULL
);
INSERT INTO "auth_versions" VALUES(1,'{"alg": "scrypt", "dklen": 32, "hash": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "n": 32768, "p": 1, "r": 8, "salt": "BBBBBBBBBBBBBBBBBBBBBB==", "v": 1}','2026-11-29T12:00:00+00:00','admin:root');
CREATE TABLE node_auth (
    name       TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,                 -- the auth password live on the node
    updated_at TEXT NOT NULL
);
INSERT INTO "node_auth" VALUES('node1',1,'2026-11-29T12:00:00+00:00');
CREATE TABLE nodes (
    name             TEXT PRIMARY KEY,
    addresses        TEXT NOT NULL,      -- JSON list of IPs
    dns_names        TEXT NOT NULL,      -- JSON list
    agent_version    TEXT NOT NULL,
    agent_port       INTEGER NOT NULL,
    key_pin          TEXT NOT NULL,      -- sha256 SPKI of the node's key: its identity
    cert_fingerprint TEXT NOT NULL,
    cert_serial      TEXT NOT NULL,
    cert_not_after   TEXT NOT NULL,
    enrolled_at      TEXT NOT NULL,
    last_heartbeat   TEXT
);
INSERT INTO "nodes" VALUES('node1','["127.0.10.2"]','[]','0.1.0',9442,'sha256:1111111111111111111111111111111111111111111111111111111111111111','sha256:2222222222222222222222222222222222222222222222222222222222222222','ab12','2027-12-31T12:00:00+00:00','2026-11-29T12:00:00+00:00','2026-11-29T12:00:00+00:00');
INSERT INTO "nodes" VALUES('node2','["127.0.10.3"]','[]','0.1.0',9442,'sha256:3333333333333333333333333333333333333333333333333333333333333333','sha256:4444444444444444444444444444444444444444444444444444444444444444','cd34','2027-12-31T12:00:00+00:00','2026-11-29T12:00:00+00:00',NULL);
CREATE TABLE rollout_nodes (
    rollout_id        TEXT NOT NULL REFERENCES rollouts(id),
    name              TEXT NOT NULL,
    state             TEXT NOT NULL,
    reason            TEXT NOT NULL DEFAULT '',
    scope_frozen      INTEGER NOT NULL DEFAULT 0,
    old_url           TEXT NOT NULL DEFAULT '',
    new_url           TEXT NOT NULL DEFAULT '',
    cert_fingerprint  TEXT NOT NULL DEFAULT '',
    cert_not_after    TEXT,
    freeze_started_at TEXT,
    freeze_ended_at   TEXT,
    restart_seconds   REAL NOT NULL DEFAULT 0,
    bootstrap_port    INTEGER NOT NULL DEFAULT 0,
    steps             TEXT NOT NULL DEFAULT '{}',  -- step -> [started_at, ended_at]
    PRIMARY KEY (rollout_id, name)
);
INSERT INTO "rollout_nodes" VALUES('r20261129-120000-ab12','node1','done','',0,'http://127.0.10.2:8080/praxis_live/','https://127.0.10.2:8443/praxis_live/','sha256:5555555555555555555555555555555555555555555555555555555555555555',NULL,NULL,NULL,0.5,0,'{"switch": ["2026-11-29T12:00:00+00:00", "2026-11-29T12:00:00+00:00"]}');
INSERT INTO "rollout_nodes" VALUES('r20261129-120000-ab12','node2','rolled_back','outside check failed: x; ROLLBACK FAILED, node needs attention: restart: no answer',0,'','','',NULL,NULL,NULL,0.0,0,'{}');
CREATE TABLE rollouts (
    id             TEXT PRIMARY KEY,
    change         TEXT NOT NULL,
    scope_kind     TEXT NOT NULL,
    scope_names    TEXT NOT NULL,
    node_order     TEXT NOT NULL,
    strategy       TEXT NOT NULL,
    max_parallel   INTEGER NOT NULL,
    failure_budget INTEGER NOT NULL,
    freeze         TEXT NOT NULL,
    epoch          INTEGER NOT NULL UNIQUE,
    state          TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    started_at     TEXT,
    ended_at       TEXT,
    started_by     TEXT NOT NULL,
    leader_node    TEXT NOT NULL,
    reason         TEXT NOT NULL DEFAULT '',
    auth_version   INTEGER NOT NULL DEFAULT 0,  -- the auth password this rollout applies
    undoes         TEXT NOT NULL DEFAULT ''     -- disable-tls: the rollout it takes back
);
INSERT INTO "rollouts" VALUES('r20261129-120000-ab12','enable-tls','cluster','[]','["node1", "node2"]','direct',1,0,'node',1,'halted','2026-11-29T12:00:00+00:00','2026-11-29T12:00:00+00:00','2026-11-29T12:00:00+00:00','admin:root','node2','halted: node2 rolled_back',1,'');
CREATE TABLE tokens (
    id           TEXT PRIMARY KEY,
    secret_hash  TEXT NOT NULL,          -- sha256 of the secret; the secret itself is not kept
    description  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    uses_allowed INTEGER NOT NULL,
    uses_left    INTEGER NOT NULL,
    revoked_at   TEXT
);
INSERT INTO "tokens" VALUES('abc123','4b4ad1506144b79b4de8dab54c125dc4f60cdf0b1b8a74cd847f2e7a881cacaa','fixture','2026-11-29T12:00:00+00:00','2026-11-29T13:00:00+00:00',2,0,NULL);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('audit',9);
COMMIT;
PRAGMA user_version=1;
