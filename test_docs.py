"""Tests that the documentation says what the code does.

The docs are read as text and checked against the code's own tables, never against a
copy: every server setting (`progressista.SETTINGS_TABLE`, with the flags the parser
really registers) appears in the configuration docs with its default; every client
environment variable appears in docs/client.md; the client's limits equal the
server's, and a limit one side has and the other lacks is named; every route the server
registers is named in docs/PROTOCOL.md; every relative link and anchor in the docs
resolves. No server, no network.
"""

import argparse
import os
import re

import pytest

import progressista
import progressista_client

ROOT = os.path.dirname(os.path.abspath(__file__))
DOCS = [os.path.join("README.md")] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
    if name.endswith(".md")) + [os.path.join("bench", "README.md")]

# Written on another branch at the same time; a link to it is checked once it exists.
PENDING_FILES = {"docs/browsers.md"}


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as file:
        return file.read()


def without_code_blocks(text):
    """Markdown with its fenced code blocks blanked out (a '# comment' is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def section(text, heading):
    """The body of the `## heading` section of `text`, up to the next `## `."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text,
                      flags=re.MULTILINE | re.DOTALL)
    assert match, f"no '## {heading}' section"
    return match.group(1)


# --- Settings ----------------------------------------------------------------------------


def serve_parser():
    parser = progressista.build_parser()
    subparsers = next(action for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices["serve"]


def setting_names():
    """(setting name, its flags, its environment variables) for every server setting."""
    flags_by_dest = {}
    for action in serve_parser()._actions:
        flags_by_dest.setdefault(action.dest, []).extend(action.option_strings)
    rows = []
    for setting in progressista.SETTINGS_TABLE:
        variables = [progressista.ENV_PREFIX + setting.env]
        if setting.name == "api_tokens":  # one token, or several: both are read
            variables.append(progressista.ENV_PREFIX + "API_TOKEN")
        rows.append((setting.name, flags_by_dest.get(setting.name, []), variables))
    return rows


def configuration_docs():
    return section(read("README.md"), "Configuration") + read("docs/operations.md")


@pytest.mark.parametrize("name, flags, variables", setting_names(),
                         ids=[row[0] for row in setting_names()])
def test_every_setting_has_its_flag_and_variable_in_the_configuration_docs(
        name, flags, variables):
    docs = configuration_docs()
    assert flags, f"setting {name}: the serve command registers no flag for it"
    for flag in flags:
        assert re.search(rf"`{re.escape(flag)}[` ]", docs), (
            f"setting {name}: flag {flag} is not in README.md's Configuration table "
            "or docs/operations.md")
    for variable in variables:
        assert f"`{variable}`" in docs, (
            f"setting {name}: variable {variable} is not in README.md's Configuration "
            "table or docs/operations.md")


def readme_configuration_rows():
    """{flag: default cell} of the README's server settings table."""
    rows = {}
    for line in section(read("README.md"), "Configuration").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`--"):
            rows[re.match(r"`(--[a-z-]+)", cells[0]).group(1)] = cells[2]
    return rows


def test_readme_gives_each_numeric_setting_the_default_the_code_has():
    defaults = {field.name: field.default
                for field in progressista.dataclasses.fields(progressista.Settings)}
    rows = readme_configuration_rows()
    checked = []
    for name, flags, _ in setting_names():
        default = defaults[name]
        if type(default) not in (int, float):
            continue
        cell = next((rows[flag] for flag in flags if flag in rows), None)
        assert cell is not None, f"setting {name}: no row in README.md's Configuration table"
        shown = re.match(r"`([0-9.]+)`", cell)
        assert shown, f"setting {name}: the default cell {cell!r} is not a number"
        assert float(shown.group(1)) == default, (
            f"setting {name}: README.md says the default is {shown.group(1)}, "
            f"the code says {default}")
        checked.append(name)
    assert "stale_seconds" in checked and "max_body_bytes" in checked


def test_every_client_environment_variable_is_in_docs_client_md():
    client_docs = read("docs/client.md")
    variables = [value for name, value in vars(progressista_client).items()
                 if name.startswith("ENV_") and isinstance(value, str)]
    assert "PROGRESSISTA_SERVER_URL" in variables
    missing = [variable for variable in variables if f"`{variable}`" not in client_docs]
    assert not missing, f"client variables missing from docs/client.md: {missing}"


# --- Limits ------------------------------------------------------------------------------

# The client's name for a server limit it must equal.
RENAMED_LIMITS = {"MAX_BATCH_TASKS": "MAX_BATCH_ITEMS"}
# Client limits that must stay at or below a server limit (the server's is a default).
CLIENT_WITHIN = {"MAX_BATCH_BYTES": "MAX_BODY_BYTES"}
# Limits only one side has, and why. A new MAX_* constant must be added to a pair or here.
CLIENT_ONLY = {
    "MAX_META_VALUE_CHARS": "the client clips each meta key and string value; the server "
                            "bounds only the whole meta (MAX_META_BYTES)",
    "MAX_RESPONSE_BYTES": "how much of the server's answer the client reads",
    "MAX_PENDING_FINALS": "final states kept per process while the server is down",
}
SERVER_ONLY = {
    "MAX_HEADER_BYTES": "request line and headers; the client's are small",
    "MAX_TASKS": "the store's cap on tasks, a setting",
    "MAX_WS_MESSAGE_BYTES": "messages from /ws clients, which the client does not open",
    "MAX_DISCARD_BYTES": "how much of a refused body the server reads and drops",
    "MAX_CONNECTIONS_FALLBACK": "connections where the descriptor limit is unknown",
    "MAX_PAGE_TASKS": "the largest ?limit= of GET /tasks, which the client does not read",
    "MAX_REMOVED_REMEMBERED": "deletions GET /tasks?since= can list",
    "MAX_HISTORY_PAIRS": "the [t, n] pairs of a task's history, which the server keeps",
    "MAX_HISTORY_SETTLED": "history pairs before the latest, part of MAX_HISTORY_PAIRS",
    "MAX_SEQ": "the largest seq; the client's are wall-clock microseconds, near 2**51",
}


def limits(module):
    return {name: value for name, value in vars(module).items()
            if name.startswith("MAX_") and type(value) is int}


def test_client_limits_equal_the_servers():
    client, server = limits(progressista_client), limits(progressista)
    problems = []
    for name, value in sorted(client.items()):
        twin = RENAMED_LIMITS.get(name, name)
        if name in CLIENT_ONLY:
            continue
        if name in CLIENT_WITHIN:
            if value > server[CLIENT_WITHIN[name]]:
                problems.append(f"client {name} = {value} is over the server's "
                                f"{CLIENT_WITHIN[name]} = {server[CLIENT_WITHIN[name]]}")
        elif twin not in server:
            problems.append(f"client limit {name} has no server limit {twin}")
        elif value != server[twin]:
            problems.append(f"client {name} = {value}, server {twin} = {server[twin]}")
    matched = {RENAMED_LIMITS.get(name, name) for name in client} | set(CLIENT_WITHIN.values())
    for name in sorted(server):
        if name not in matched and name not in SERVER_ONLY:
            problems.append(f"server limit {name} = {server[name]} has no client limit "
                            f"{name}")
    assert not problems, "\n".join(problems)


def test_limit_lists_name_only_limits_that_exist():
    client, server = limits(progressista_client), limits(progressista)
    stale = ([name for name in list(RENAMED_LIMITS) + list(CLIENT_WITHIN) + list(CLIENT_ONLY)
              if name not in client]
             + [name for name in list(RENAMED_LIMITS.values()) + list(CLIENT_WITHIN.values())
                + list(SERVER_ONLY) if name not in server])
    assert not stale, f"test_docs.py names limits that no longer exist: {stale}"


def test_protocol_states_each_field_limit_the_server_enforces():
    protocol = read("docs/PROTOCOL.md")
    for name in ("MAX_BODY_BYTES", "MAX_HEADER_BYTES", "MAX_BATCH_ITEMS", "MAX_TASK_ID_CHARS",
                 "MAX_DESC_CHARS", "MAX_POSTFIX_CHARS", "MAX_UNIT_CHARS", "MAX_ERROR_CHARS",
                 "MAX_META_BYTES", "MAX_TASKS", "MAX_WS_MESSAGE_BYTES"):
        assert f"`{name}`" in protocol, f"docs/PROTOCOL.md does not name {name}"
    for name in ("MAX_TASK_ID_CHARS", "MAX_DESC_CHARS", "MAX_UNIT_CHARS", "MAX_ERROR_CHARS",
                 "MAX_BATCH_ITEMS"):
        shown = f"{getattr(progressista, name):,}"
        row = next(line for line in protocol.splitlines() if f"`{name}`" in line)
        assert shown in row, f"docs/PROTOCOL.md gives {name} without its value {shown}"


# --- Routes ------------------------------------------------------------------------------


def registered_routes():
    app = progressista.App(progressista.Settings())
    routes = [(method, path) for path, methods in app.api.routes.items() for method in methods]
    routes += [(method, "/tasks/{task_id}") for method in app.api.task_routes]
    return sorted(routes)


def test_protocol_names_every_route_the_server_registers():
    protocol = read("docs/PROTOCOL.md")
    routes = registered_routes()
    assert ("POST", "/progress") in routes
    missing = [f"{method} {path}" for method, path in routes
               if f"`{method} {path}`" not in protocol]
    assert not missing, f"routes missing from docs/PROTOCOL.md's Routes: {missing}"


# --- Links -------------------------------------------------------------------------------


def anchors(path):
    """The anchors GitHub makes for the headings of a Markdown file."""
    made = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code_blocks(read(path)),
                              flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, count = slug, 0
        while candidate in made:
            count += 1
            candidate = f"{slug}-{count}"
        made.add(candidate)
    return made


def relative_links(path):
    text = without_code_blocks(read(path))
    text = re.sub(r"`[^`\n]*`", "", text)  # `[x](y)` in a code span is no link
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_anchor_rule_matches_githubs():
    assert "extending-create_app-middleware-stores" in anchors("docs/operations.md")
    assert "compatibility-with-02x" in anchors("docs/PROTOCOL.md")


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(doc), file_part)) \
            if file_part else doc
        if not os.path.exists(os.path.join(ROOT, linked)):
            if linked.replace(os.sep, "/") not in PENDING_FILES:
                broken.append(f"{target}: no file {linked}")
            continue
        if anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked}")
    assert not broken, f"{doc}: broken links:\n" + "\n".join(broken)


def test_readme_stays_the_front_door():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 350
    assert 'pip install -q -e ".[test]" && python -m pytest -q' in readme.split("## ")[0]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as file:
        assert 'pip install -q -e ".[test]" && python -m pytest -q' in file.read()


def test_the_server_and_the_client_are_one_version():
    import progressista_client
    assert progressista_client.__version__ == progressista.__version__
