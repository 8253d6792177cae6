"""The command line: serve, show-config, version, help, the startup line, logging, signals.

Most tests run `python progressista.py ...` as a subprocess (conftest.run_cli to its end,
conftest.cli_server while it serves) in a clean environment and read its exit status,
stdout and stderr; `main()` runs in-process where no server starts.
"""

from http.client import HTTPConnection
import json
import logging
import re
import signal
import subprocess
import sys
import time

import pytest
from websockets.sync.client import connect as ws_connect

import progressista
from conftest import (PROGRAM, bearer, clean_env, cli_server, free_port, http, open_listener,
                      port_is_free, post, run_cli, running_server, wait_for)

pytestmark = pytest.mark.timeout(60)


# --- serve: listening and the startup line -----------------------------------------------


def test_cli_port_zero_listens_on_the_port_it_prints():
    with cli_server("--host", "127.0.0.1", "--port", "0") as server:
        assert server.port > 0
        assert http("GET", server.url + "/health")[1]["status"] == "ok"


def test_cli_serve_subcommand_means_the_same():
    with cli_server("serve", "--host", "127.0.0.1", "--port", "0") as server:
        assert http("GET", server.url + "/health")[0] == 200


def test_cli_startup_line_names_dashboard_url():
    with cli_server("--host", "127.0.0.1", "--port", "0") as server:
        assert f"http://127.0.0.1:{server.port}/" in server.stderr


def test_the_startup_line_names_the_store_and_how_many_tasks_it_loaded(tmp_path, caplog):
    path = tmp_path / "tasks.db"
    with running_server(store=f"sqlite:///{path}") as server:
        post(server, [{"task_id": "a"}, {"task_id": "b", "status": "close"}])
    caplog.set_level(logging.INFO, logger="progressista")
    with running_server(store=f"sqlite:///{path}"):
        pass
    assert any("store: sqlite, 2 tasks loaded" in record.getMessage()
               for record in caplog.records)


def test_cli_warns_when_listening_on_all_interfaces_without_token():
    with cli_server("--host", "0.0.0.0", "--port", "0") as server:
        wait_for(lambda: "WARNING" in server.stderr, 3, message="the warning")
        assert "token" in server.stderr.split("WARNING", 1)[1].lower()


def test_cli_does_not_warn_on_loopback_or_with_a_token():
    with cli_server("--host", "0.0.0.0", "--port", "0", "--api-token", "t") as public, \
            cli_server("--host", "127.0.0.1", "--port", "0") as loopback:
        http("GET", public.url + "/health")
        http("GET", loopback.url + "/health")
        public.stop()
        loopback.stop()
    assert "WARNING" not in public.stderr and "WARNING" not in loopback.stderr


# --- Settings from flags and the environment ---------------------------------------------


def test_cli_show_config_prints_json_settings_with_tokens_masked():
    result = run_cli("show-config", "--port", "9123",
                     PROGRESSISTA_API_TOKEN="s3cret-value", PROGRESSISTA_STALE_SECONDS="5")
    assert result.returncode == 0
    config = json.loads(result.stdout)
    assert (config["port"], config["stale_seconds"]) == (9123, 5.0)
    assert len(config["api_tokens"]) == 1
    assert "s3cret" not in result.stdout + result.stderr


def test_cli_show_config_masks_a_password_in_the_store_url():
    result = run_cli("show-config", "--store", "redis://user:hunter2@db.internal:6379/0")
    assert result.returncode == 0
    assert "hunter2" not in result.stdout
    assert json.loads(result.stdout)["store"] == "redis://user:***@db.internal:6379/0"


def test_cli_flags_win_over_environment():
    result = run_cli("show-config", "--port", "9001", PROGRESSISTA_PORT="9002")
    assert json.loads(result.stdout)["port"] == 9001


def test_cli_tokens_from_both_environment_variables_are_all_accepted():
    with cli_server("--host", "127.0.0.1", "--port", "0", PROGRESSISTA_API_TOKEN="one",
                    PROGRESSISTA_API_TOKENS="two, three") as server:
        assert http("GET", server.url + "/tasks")[0] == 401
        for token in ("one", "two", "three"):
            status, _, _ = http("GET", server.url + "/tasks",
                                headers=bearer(token))
            assert status == 200, token


def test_cli_read_tokens_from_the_environment_may_only_read():
    with cli_server("--host", "127.0.0.1", "--port", "0", PROGRESSISTA_API_TOKEN="writer",
                    PROGRESSISTA_READ_TOKENS="r1, r2") as server:
        for token in ("r1", "r2"):
            auth = bearer(token)
            assert http("GET", server.url + "/tasks", headers=auth)[0] == 200, token
            assert http("POST", server.url + "/progress", {"task_id": "x"},
                        headers=auth)[0] == 403, token
        assert http("POST", server.url + "/progress", {"task_id": "x"},
                    headers=bearer("writer"))[0] == 200


def test_cli_read_token_alone_is_a_one_line_error_and_show_config_masks_it():
    result = run_cli("--read-token", "viewer", "--port", "0")
    assert result.returncode == 2
    assert "read tokens need an API token" in result.stderr and "Traceback" not in result.stderr
    shown = run_cli("show-config", "--read-token", "viewer", "--read-token", "guest",
                    "--api-token", "writer")
    assert shown.returncode == 0 and json.loads(shown.stdout)["read_tokens"] == ["***", "***"]
    assert not {"viewer", "guest", "writer"} & set(re.findall(r"\w+", shown.stdout))


def test_cli_empty_api_token_is_a_one_line_error():
    result = run_cli("--api-token", "", "--port", "0")
    assert result.returncode == 2
    assert "must not be empty" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--port", "-1"], ["--port", "abc"], ["--port", "70000"],
                                  ["--stale-seconds", "x"], ["--max-tasks", "0"],
                                  ["--log-level", "loud"]],
                         ids=lambda args: " ".join(args))
def test_cli_bad_flag_value_exits_2_with_one_line_error(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr


@pytest.mark.parametrize("name, value", [("PROGRESSISTA_PORT", "abc"),
                                         ("PROGRESSISTA_STALE_SECONDS", "-5")])
def test_cli_bad_env_var_exits_2_with_one_line_error_naming_it(name, value):
    result = run_cli("--port", "0", **{name: value})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], result.stderr


# --- Help, version, and a mistyped command -----------------------------------------------


def test_cli_version_prints_version():
    result = run_cli("version")
    assert result.returncode == 0
    assert progressista.__version__ in result.stdout


def test_cli_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    # In the list of subcommands, not just anywhere: the epilog names them all too.
    for command in ("serve", "demo", "run", "version", "show-config", "watch"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


def test_cli_help_lists_environment_variables():
    result = run_cli("--help")
    for name in ("PROGRESSISTA_PORT", "PROGRESSISTA_HOST", "PROGRESSISTA_API_TOKEN",
                 "PROGRESSISTA_STALE_SECONDS", "PROGRESSISTA_RETENTION_SECONDS"):
        assert name in result.stdout, name


def test_cli_serve_help_lists_every_flag_with_its_environment_variable():
    result = run_cli("serve", "--help")
    for flag, env in (("--port", "PROGRESSISTA_PORT"), ("--stale-seconds",
                                                        "PROGRESSISTA_STALE_SECONDS"),
                      ("--max-tasks", "PROGRESSISTA_MAX_TASKS"),
                      ("--allow-origins", "PROGRESSISTA_ALLOW_ORIGINS")):
        assert flag in result.stdout and env in result.stdout, flag


def test_serve_help_shows_every_settings_default(capsys):
    with pytest.raises(SystemExit):
        progressista.main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "PROGRESSISTA_STALE_SECONDS; default 60]" in shown
    assert "PROGRESSISTA_STORE; default memory://]" in shown
    assert "PROGRESSISTA_WS_COMPRESSION; default off]" in shown


def test_a_mistyped_command_says_unknown_command_and_lists_the_commands(capsys):
    assert progressista.main(["servee"]) == 2
    message = capsys.readouterr().err
    assert "unknown command 'servee'" in message and "did you mean 'serve'?" in message
    for command in ("serve", "demo", "run", "watch", "version", "show-config"):
        assert command in message


# --- The request log ---------------------------------------------------------------------


def test_cli_debug_log_has_one_line_per_request_and_never_the_token():
    secret = "tok-s3cret-xyz"
    with cli_server("--host", "127.0.0.1", "--port", "0", "--log-level", "debug",
                    "--api-token", secret) as server:
        assert http("GET", server.url + f"/tasks?token={secret}")[0] == 200
        assert post(server, {"task_id": "a"}, bearer(secret))[0] == 200
        assert http("GET", server.url + "/tasks?token=wrong-guess")[0] == 401
        with open_listener(server, f"/ws?token={secret}") as ws:
            ws.recv(timeout=3)
        wait_for(lambda: len(re.findall(r"GET /tasks\S* 401", server.stderr)) == 1, 3,
                 message="the request log lines")
        assert server.stop() == 0
    log_text = server.stderr
    assert secret not in log_text and "wrong-guess" not in log_text
    assert len(re.findall(r"GET /tasks\?token=\S* 200 [\d.]+ ?ms", log_text)) == 1
    assert len(re.findall(r"POST /progress 200 [\d.]+ ?ms", log_text)) == 1
    assert len(re.findall(r"GET /ws\?token=\S* 101", log_text)) == 1


def test_cli_debug_log_masks_a_token_whose_name_was_percent_escaped():
    secret = "tok-escaped-name"
    with cli_server("--host", "127.0.0.1", "--port", "0", "--log-level", "debug",
                    "--api-token", secret) as server:
        assert http("GET", server.url + f"/tasks?tok%65n={secret}&x=1")[0] == 200
        wait_for(lambda: "GET /tasks?" in server.stderr, 3, message="the request line")
        assert server.stop() == 0
    assert secret not in server.stderr
    assert "token=***" in server.stderr


def test_cli_warning_log_level_quiets_the_websocket_lines_too():
    port = free_port()  # no startup line to read the port from at this level
    server = subprocess.Popen([sys.executable, PROGRAM, "--host", "127.0.0.1", "--port",
                               str(port), "--log-level", "warning"], env=clean_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/health"), timeout=10, message="the server")
        with ws_connect(f"ws://127.0.0.1:{port}/ws", proxy=None) as ws:
            ws.recv(timeout=3)
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0 and stderr == ""


def _answers(url):
    try:
        return http("GET", url, timeout=1)[0] == 200
    except OSError:
        return False


# --- Signals -----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_signal_exits_0_promptly_and_frees_the_port(signum):
    with cli_server("--host", "127.0.0.1", "--port", "0") as server:
        idle = HTTPConnection("127.0.0.1", server.port, timeout=5)
        idle.request("GET", "/health")  # an idle keep-alive connection must not hold it up
        idle.getresponse().read()
        with open_listener(server) as listener:
            listener.recv(timeout=3)
            started = time.monotonic()
            assert server.stop(signum, timeout=5) == 0
            assert time.monotonic() - started < 3
        idle.close()
    assert port_is_free(server.port)


def test_a_stale_timeout_below_twice_the_client_heartbeat_is_warned_about(caplog):
    caplog.set_level(logging.WARNING, logger="progressista")
    with running_server(stale_seconds=20):
        pass
    warned = [record.getMessage() for record in caplog.records
              if "heartbeat" in record.getMessage()]
    assert warned and "--stale-seconds 20 is below twice the client's heartbeat (15 s)" in \
        warned[0]
    caplog.clear()
    with running_server(stale_seconds=30):
        pass
    assert not [record for record in caplog.records if "heartbeat" in record.getMessage()]


def test_the_server_knows_the_clients_default_heartbeat():
    import progressista_client
    assert progressista.CLIENT_HEARTBEAT_S == progressista_client.DEFAULT_HEARTBEAT_INTERVAL_S


def test_show_config_shows_the_allowed_hosts_in_force_not_an_empty_default():
    loopback = run_cli("show-config", "--host", "127.0.0.1")
    assert json.loads(loopback.stdout)["allowed_hosts"] == ["127.0.0.1", "[::1]", "localhost"]
    anywhere = run_cli("show-config", "--host", "0.0.0.0")
    assert json.loads(anywhere.stdout)["allowed_hosts"] == ["*"]
