"""What the ``tlsroll`` process costs around a command, run as the program (``tlsroll.cli.main``
without ``argv``, as its console script and ``python -m tlsroll`` call it): the garbage
collector paused while the command's modules are imported, and no interpreter teardown after a
command that said it leaves nothing to finalize (``tlsroll schema show``). Behaviour only; the
figures are ``make bench-schema``'s."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.cluster import Cluster, child_env
from tests.test_perf_shape import store_finished_rollout

# Runs ``tlsroll ARGS`` as the program does (``main()`` on sys.argv); an atexit hook says on
# stderr whether the interpreter's teardown ran, and with what collector state.
AS_THE_PROGRAM = """
import atexit, gc, sys
atexit.register(
    lambda: print(f"teardown gc={gc.isenabled()} frozen={gc.get_freeze_count()}", file=sys.stderr)
)
sys.argv = ["tlsroll", *sys.argv[1:]]
from tlsroll.cli import main
sys.exit(main())
"""


def as_the_program(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = {"TLSROLL_DATA_DIR": str(data_dir)} if data_dir else {}
    return subprocess.run(
        [sys.executable, "-c", AS_THE_PROGRAM, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(extra),
        check=False,
    )


def test_the_collector_resumes_once_the_command_is_loaded_and_leaves_its_modules_be() -> None:
    """The collector is paused while the command's modules load, then runs again for the
    command's own work, without walking those modules' objects (they are frozen)."""
    done = as_the_program("schema", "--help")
    assert done.returncode == 0, done.stderr
    assert "show" in done.stdout
    teardown = [line for line in done.stderr.splitlines() if line.startswith("teardown")]
    assert len(teardown) == 1, done.stderr
    gc_on, frozen = teardown[0].split()[1:]
    assert gc_on == "gc=True"
    assert int(frozen.removeprefix("frozen=")) > 10_000  # click, the command group, …

    # not as the program (the tests, a caller of main(argv)): the collector as it was
    code = (
        "import gc; from tlsroll.cli import main; main(['schema', '--help']); "
        "print(gc.isenabled(), gc.get_freeze_count())"
    )
    inproc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert inproc.stdout.split()[-2:] == ["True", "0"]


def test_schema_show_ends_without_the_teardown_and_with_all_its_output(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """`schema show` ends the process as soon as its output is flushed: the whole of a reply
    bigger than a pipe's buffer arrives, errors keep their line and exit code, and commands
    that did not say so (`--version`) still end the usual way."""
    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        for epoch in range(1, 121):
            store_finished_rollout(cluster, f"r-{epoch:03d}", epoch)
        cluster.start_leader()
        data_dir = cluster.data_dir

        every = as_the_program("schema", "show", "--all", "--json", data_dir=data_dir)
        assert every.returncode == 0, every.stderr
        assert len(every.stdout) > 2**16  # more than a pipe holds: flushed before the end
        rollouts = json.loads(every.stdout)["rollouts"]
        assert [r["id"] for r in rollouts] == [f"r-{e:03d}" for e in range(120, 0, -1)]
        assert "teardown" not in every.stderr

        text = as_the_program("schema", "show", data_dir=data_dir)
        assert text.returncode == 0, text.stderr
        assert "rollout r-120" in text.stdout and "119 older rollout(s) not shown" in text.stdout
        assert text.stderr == ""

        missing = as_the_program("schema", "show", "--rollout", "r-nope", data_dir=data_dir)
        assert missing.returncode == 1 and missing.stdout == ""
        assert missing.stderr == (
            "tlsroll: error: no rollout 'r-nope' (see: tlsroll schema show --all)\n"
        )

    version = as_the_program("--version")
    assert version.returncode == 0 and "tlsroll" in version.stdout
    assert "teardown gc=True" in version.stderr


def test_the_schema_methods_are_the_protos_and_the_leaders() -> None:
    """The CLI names the schema's methods itself (so as not to import the messages): the
    proto's ``SchemaView.GetSchema``, and the same served by the leader with the JSON codec."""
    from leader.cli.base import GET_SCHEMA, GET_SCHEMA_JSON
    from leader.schema_view import JSON_SERVICE
    from tlsroll.v1 import schema_pb2

    service = schema_pb2.DESCRIPTOR.services_by_name["SchemaView"]
    assert f"/{service.full_name}/GetSchema" == GET_SCHEMA
    assert "GetSchema" in service.methods_by_name
    assert f"/{JSON_SERVICE}/GetSchema" == GET_SCHEMA_JSON


def test_the_json_codec_answers_what_get_schema_answers(
    tmp_path: Path, loopback: Callable[[], str]
) -> None:
    """``SchemaViewJson.GetSchema`` (what `schema show` reads) is ``GetSchema``'s reply as
    `--json` data, for every kind of request, with its refusals; a request that is not a
    ``GetSchemaRequest`` in JSON is refused, and the leader goes on answering."""
    from leader.cli.base import GET_SCHEMA, GET_SCHEMA_JSON, to_dict
    from leader.cli.unary import RpcFailed, UnaryChannel
    from tlsroll.v1 import schema_pb2

    with Cluster(tmp_path / "cluster", loopback()) as cluster:
        cluster.init()
        for epoch in range(1, 4):
            store_finished_rollout(cluster, f"r-{epoch}", epoch)
        cluster.start_leader()
        with UnaryChannel(str(cluster.admin_socket)) as channel:
            for request in (
                {},
                {"limit": 1},
                {"limit": 1, "rollouts_only": True},
                {"rollout_id": "r-2", "rollouts_only": True},
            ):
                proto = schema_pb2.GetSchemaRequest(**request).SerializeToString()
                want = to_dict(schema_pb2.Schema.FromString(channel.call(GET_SCHEMA, proto)))
                got = json.loads(
                    channel.call(GET_SCHEMA_JSON, json.dumps(request).encode(), codec="json")
                )
                assert got.pop("generated_at") and want.pop("generated_at")
                assert got == want, request
            assert [r["id"] for r in got["rollouts"]] == ["r-2"]

            missing = json.dumps({"rollout_id": "r-nope"}).encode()
            try:
                channel.call(GET_SCHEMA_JSON, missing, codec="json")
            except RpcFailed as exc:
                assert (exc.code, exc.details) == (
                    "NOT_FOUND",
                    "no rollout 'r-nope' (see: tlsroll schema show --all)",
                )
            else:
                raise AssertionError("a missing rollout was answered")

            # Review L5: deep nesting makes json.loads raise RecursionError (protobuf's Parse
            # wraps it since 6.31 at least, so these two were refused already); `[]` (Parse
            # took it for an empty request) and a request longer than any GetSchemaRequest
            # (parsed on the event loop) were answered.
            deep = b"[" * 100_000
            deep_within_the_bound = b'{"limit": ' + b"[" * 1_500 + b"]" * 1_500 + b"}"
            bads = (b"{not json", b'{"limit": "many"}', b'{"colour": "red"}', b"\xff")
            long = b" " * 70_000 + b"{}"
            not_json = "tlsroll.v1.SchemaViewJson: the request is not a GetSchemaRequest in JSON"
            for bad in (*bads, deep, deep_within_the_bound, b"[]", b" []", long):
                try:
                    channel.call(GET_SCHEMA_JSON, bad, codec="json")
                except RpcFailed as exc:
                    assert exc.code == "INVALID_ARGUMENT", (bad, exc)
                    assert exc.details == not_json
                else:
                    raise AssertionError(f"{bad!r:.40} was answered")
            # A rollout id no rollout has (it was echoed in NOT_FOUND: a header block too big
            # for the client to read, INTERNAL): refused, not echoed (by the JSON codec, as
            # any request longer than a GetSchemaRequest).
            long_id = {"rollout_id": "r" * 100_000}
            not_an_id = (
                "rollout_id is not a rollout id (1-64 letters, digits, '.', '_' or '-'); "
                "see: tlsroll schema show"
            )
            for method, body, codec, details in (
                (GET_SCHEMA_JSON, json.dumps(long_id).encode(), "json", not_json),
                (GET_SCHEMA_JSON, b'{"rollout_id": "r 1"}', "json", not_an_id),
                (
                    GET_SCHEMA,
                    schema_pb2.GetSchemaRequest(
                        rollout_id=long_id["rollout_id"]
                    ).SerializeToString(),
                    "proto",
                    not_an_id,
                ),
            ):
                try:
                    channel.call(method, body, codec=codec)
                except RpcFailed as exc:
                    assert (exc.code, exc.details) == ("INVALID_ARGUMENT", details), codec
                else:
                    raise AssertionError(
                        f"a rollout id of 100 000 characters was answered ({codec})"
                    )
            assert "Traceback" not in cluster.leader.log_text()
            again = json.loads(channel.call(GET_SCHEMA_JSON, b'{"limit": 1}', codec="json"))
            assert [r["id"] for r in again["rollouts"]] == ["r-3"]
