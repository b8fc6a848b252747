-- Written by tlsroll 0.1.0 (commit 1fb4745), the layout before schema migrations.
BEGIN TRANSACTION;
CREATE TABLE entries (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL UNIQUE,
    body       TEXT    NOT NULL,
    created_at TEXT    NOT NULL
);
INSERT INTO "entries" VALUES(1,'7dcf32ed12da42dd89eba9faab435dd2','{"text":"entry one"}','2026-11-30T00:12:30.986+00:00');
INSERT INTO "entries" VALUES(2,'e6ca013d6dd14b10b33dae46446e05a6','{"text":"zwei"}','2026-11-30T00:12:30.986+00:00');
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('entries',2);
COMMIT;
PRAGMA user_version=0;
