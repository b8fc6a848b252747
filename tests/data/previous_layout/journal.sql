-- Written by tlsroll 0.1.0 (commit 1fb4745), the layout before schema migrations.
BEGIN TRANSACTION;
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL,
    rollout_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    step       TEXT NOT NULL,
    what       TEXT NOT NULL,
    detail     TEXT NOT NULL
);
INSERT INTO "events" VALUES(1,'2026-11-30T00:12:30.981870+00:00','r1','switch','create','end','{}');
INSERT INTO "events" VALUES(2,'2026-11-30T00:12:30.982297+00:00','r1','switch','rolling_back','end','{}');
INSERT INTO "events" VALUES(3,'2026-11-30T00:12:30.982621+00:00','r1','switch','restored','end','{}');
INSERT INTO "events" VALUES(4,'2026-11-30T00:12:30.982958+00:00','r0','switch','create','end','{}');
INSERT INTO "events" VALUES(5,'2026-11-30T00:12:30.983313+00:00','r0','switch','completed','end','{"outcome": "completed"}');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('epoch','3');
INSERT INTO "meta" VALUES('live_tls','{"ca_file": "/x/ca.pem", "cert_file": "/x/server.pem", "key_file": "/x/server.key", "server_url": "https://127.0.10.2:8443/praxis_live/", "verifier_file": ""}');
CREATE TABLE staged (
    rollout_id  TEXT PRIMARY KEY,
    key_file    TEXT NOT NULL,
    csr_pem     TEXT NOT NULL,
    cert_file   TEXT,
    ca_file     TEXT,
    fingerprint TEXT,
    not_after   TEXT
);
INSERT INTO "staged" VALUES('r1','/x/server.key','-----BEGIN CERTIFICATE REQUEST-----
fixture
-----END CERTIFICATE REQUEST-----
',NULL,NULL,NULL,NULL);
CREATE TABLE txns (
    rollout_id        TEXT NOT NULL,
    kind              TEXT NOT NULL,
    epoch             INTEGER NOT NULL,
    phase             TEXT NOT NULL,
    outcome           TEXT NOT NULL DEFAULT '',
    reason            TEXT NOT NULL DEFAULT '',
    watermark         INTEGER,
    started_at        TEXT NOT NULL,
    ended_at          TEXT,
    freeze_started_at TEXT,
    freeze_ended_at   TEXT,
    restart_seconds   REAL NOT NULL DEFAULT 0,
    old_url           TEXT NOT NULL DEFAULT '',
    new_url           TEXT NOT NULL DEFAULT '',
    cert_fingerprint  TEXT NOT NULL DEFAULT '',
    plan              TEXT NOT NULL,
    PRIMARY KEY (rollout_id, kind)
);
INSERT INTO "txns" VALUES('r1','switch',3,'restored','','verify: no answer',NULL,'2026-11-29T12:00:00+00:00',NULL,NULL,NULL,0.0,'','','','{"backup_file": "/x/txn/r1-switch.old", "ca_file": "/x/ca.pem", "facts": ["127.0.10.2", "/praxis_live/", 8080, 8443, ["http"]], "failed_phase": "restarted", "keep_frozen": false, "live_before": null, "live_tls": null, "new_config_file": "/x/txn/r1-switch.new", "restart_needed": true, "source_schemes": ["http"], "target_fingerprint": "sha256:6666666666666666666666666666666666666666666666666666666666666666", "target_schemes": ["https"]}');
INSERT INTO "txns" VALUES('r0','switch',2,'completed','completed','',7,'2026-11-29T12:00:00+00:00','2026-11-29T12:00:00+00:00',NULL,NULL,0.4,'','','','{"backup_file": "/x/txn/r1-switch.old", "ca_file": "/x/ca.pem", "facts": ["127.0.10.2", "/praxis_live/", 8080, 8443, ["http"]], "keep_frozen": false, "live_before": null, "live_tls": null, "new_config_file": "/x/txn/r1-switch.new", "source_schemes": ["http"], "target_fingerprint": "sha256:6666666666666666666666666666666666666666666666666666666666666666", "target_schemes": ["https"]}');
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('events',5);
COMMIT;
PRAGMA user_version=0;
