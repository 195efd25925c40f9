import subprocess
import sys

import pytest


def run_cai(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_unknown_model_is_one_line_error_without_traceback():
    result = run_cai("ask", "hello", "--model", "no-such-model")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown model 'no-such-model'" in lines[0]


def test_models_list_shows_builtin():
    result = run_cai("models", "list")
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m-instruct" in result.stdout


def test_ask_answers_with_tiny_model(tiny_causal_lm_dir):
    result = run_cai("ask", "Hello there", "--model", str(tiny_causal_lm_dir), "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "assistant:" in result.stdout and "tokens in" in result.stdout


def test_version(capsys):
    from cai import __version__
    from cai.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(["--version"])
    assert exit_code.value.code == 0 and capsys.readouterr().out == f"cai {__version__}\n"


def test_every_option_of_every_command_has_help():
    """`cai <command> --help` explains each option, not only its type and default."""
    import typer

    from cai.cli import app

    root = typer.main.get_command(app)
    context = root.context_class(root)
    commands, bare, seen = [([], root)], [], 0
    while commands:
        path, command = commands.pop()
        seen += 1
        if hasattr(command, "list_commands"):  # a group (typer vendors click, so no isinstance)
            commands += [([*path, name], command.get_command(context, name)) for name in command.list_commands(context)]
            continue
        bare += [f"cai {' '.join(path)} {param.opts[0]}" for param in command.params
                 if param.param_type_name == "option" and not param.help and param.name != "help"]
    assert not bare, bare
    assert seen >= 25  # the walk reached the subcommands (cai label eval, cai models list...)
