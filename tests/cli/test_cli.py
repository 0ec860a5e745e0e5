"""The command line as an operator meets it (issue 25): `--version`, argument errors in words,
`--data-dir` on every platform command, a `usage` table that fits the terminal. Real processes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from lmserve.cli import build_parser
from lmserve.config import ConfigError, load_config


def _lmserve(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmserve", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, parser) for every command and sub-command."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_version():
    from lmserve import __version__

    run = _lmserve("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"lmserve {__version__}"


def test_every_typed_option_rejects_a_bad_value_in_words(capsys):
    """argparse prints `invalid <function name> value` unless the type raises ArgumentTypeError:
    each typed option, given a word, must say what it wanted instead."""
    checked = 0
    for prefix, parser in _commands(build_parser()):
        for action in parser._actions:
            if action.type is None or not action.option_strings:
                continue
            with pytest.raises(SystemExit):
                build_parser().parse_args([*prefix, action.option_strings[-1], "abc"])
            err = capsys.readouterr().err
            # argparse names the option by all its spellings: `argument --tensor-parallel-size/-tp`
            assert "invalid" not in err and f"argument {'/'.join(action.option_strings)}:" in err, err
            checked += 1
    assert checked >= 15  # --rpm and friends of keys/accounts, serve's sizes, ports, counts, chat's

    run = _lmserve("keys", "create", "--account", "a", "--rpm", "abc")
    assert run.returncode == 2 and "argument --rpm: not an integer: 'abc'" in run.stderr


def test_config_errors_of_every_section_at_once(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "server: {port: eighty}\n"
        "models:\n  - {id: a, dtype: fp16, chat_template: /no/such/template.jinja}\n  - {id: a}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "bad.yaml"))
    lines = str(e.value).splitlines()
    assert lines[0].endswith("4 problems:"), e.value
    assert [line.split(":")[0].strip(" -") for line in lines[1:]] == [
        "server.port", "models[0].dtype", "models", "models[0].chat_template"]


def test_platform_commands_take_data_dir(tmp_path):
    data = tmp_path / "state"
    created = _lmserve("keys", "create", "--account", "team", "--balance", "3", "--data-dir", str(data))
    assert created.returncode == 0, created.stderr
    assert (data / "lmserve.db").is_file()
    listed = _lmserve("keys", "list", "--json", "--data-dir", str(data))
    assert [k["account"] for k in __import__("json").loads(listed.stdout)] == ["team"]
    topped = _lmserve("accounts", "topup", "team", "2", "--data-dir", str(data))
    assert topped.returncode == 0 and "total 5" in topped.stdout, topped.stdout + topped.stderr
    assert _lmserve("usage", "--data-dir", str(data)).returncode == 0
    # the default data directory is untouched by all of that
    other = tmp_path / "default"
    assert "team" not in _lmserve("accounts", "list", LMSERVE_DATA_DIR=str(other)).stdout


def test_usage_fits_the_terminal_and_keeps_what_tells_models_apart(tmp_path):
    from lmserve.platform import keys, usage
    from lmserve.platform.db import Database

    db = Database(f"sqlite:///{tmp_path / 'lmserve.db'}")
    db.migrate()
    _, row = keys.create_key(db, "research-team")
    models = ["HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct",
              "Pro/deepseek-ai/DeepSeek-V2-Lite-Chat"]
    for model in models:
        usage.record(db, usage.UsageEntry(key_id=row.id, account_id=row.account_id, model=model, tier="free",
                                          prompt_tokens=123456, completion_tokens=654321, cost_nanos=0, status=200,
                                          latency_ms=1.0, ttft_ms=None, trace_id=f"t-{model}"))  # one row per trace
    db.close()
    for columns in (120, 80, 72):
        run = _lmserve("usage", "--data-dir", str(tmp_path), COLUMNS=str(columns))
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert max(map(len, lines)) <= columns, run.stdout
        cells = [line.split()[1] for line in lines if line.startswith("research-team")]
        assert len(set(cells)) == len(models), run.stdout  # still tells the models apart
        for model, cell in zip(models, cells, strict=True):  # the start is there, the end whole
            assert cell[0] == model[0] and cell.endswith(model[-11:]), run.stdout
            assert cell == model or columns < 120, run.stdout  # abbreviated only when it must be
