"""The documentation against the commands: docs/cli.md is their current --help, every command's help shows an
example, and every command and flag that README.md and docs/cli.md show exists."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


def _load_cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_docs = _load_cli_docs()
COMMANDS = {ctx.command_path: (ctx, command) for ctx, command in cli_docs.all_commands()}

# `bertprep X`, `.venv/bin/berttrain X`, `python -m prep X`, `torchrun … -m train X`; not `bertprep.egg-info`.
INVOCATION = re.compile(r"(?:(?<![\w.-])(bertprep|berttrain)|(?<!\S)-m (prep|train))(?=\s|$)")
PROGRAM_OF_MODULE = {"prep": "bertprep", "train": "berttrain"}
PLACEHOLDERS = {"…", "..."}
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.MULTILINE | re.DOTALL)  # indented in a list too
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def option_names(path: str) -> set[str]:
    ctx, command = COMMANDS[path]
    return {name for param in command.get_params(ctx) for name in (*param.opts, *param.secondary_opts)
            if name.startswith("-")}


def _words(command_line: str) -> list[str]:
    """The shell words of one command, up to the first comment, pipe, redirection or command separator."""
    lexer = shlex.shlex(command_line, posix=True, punctuation_chars=True)
    words = []
    try:
        for word in lexer:
            if word and all(c in lexer.punctuation_chars for c in word):
                break
            words.append(word)
    except ValueError:  # an unbalanced quote in shown output: the words before it still count
        pass
    return words


def invocation_problems(line: str) -> list[str]:
    """What is wrong with each `bertprep`/`berttrain` invocation in `line`: unknown commands and flags."""
    problems = []
    for match in INVOCATION.finditer(line):
        path = match.group(1) or PROGRAM_OF_MODULE[match.group(2)]
        for word in _words(line[match.end():]):
            if word in PLACEHOLDERS or word == "--":
                break
            if f"{path} {word}" in COMMANDS:
                path = f"{path} {word}"
            elif word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-[\d.e-]+", word):
                flag = word.split("=", 1)[0]
                if flag not in option_names(path):
                    problems.append(f"{path} has no option {flag}: {line.strip()}")
            elif path in cli_docs.command_groups():
                problems.append(f"{path} has no command {word!r}: {line.strip()}")
                break
    return problems


def shown_problems(markdown: str) -> list[str]:
    """Invocations with unknown commands or flags, in the code blocks of `markdown` (but not Click's usage lines)
    and in its inline code spans."""
    problems = []
    for block in FENCE.findall(markdown):
        for line in block.splitlines():
            if not line.startswith("Usage: "):
                problems += invocation_problems(line)
    prose = FENCE.sub("", markdown)
    for span in INLINE_CODE.findall(prose):
        problems += invocation_problems(span)
    return problems


def test_cli_reference_is_current():
    """docs/cli.md is what scripts/cli_docs.py renders from the commands now; options change often, and a reference
    that has drifted from --help misleads more than none."""
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == cli_docs.render(), f"docs/cli.md is out of date: run `{cli_docs.REGENERATE}`"


def test_check_names_the_fix_for_a_stale_file(tmp_path, capsys):
    """`scripts/cli_docs.py --check FILE` fails on a stale file and says what to run; passes on a current one."""
    stale = tmp_path / "cli.md"
    stale.write_text(cli_docs.render().replace("--max-len", "--max-length"), encoding="utf-8")
    assert cli_docs.main(["--check", str(stale)]) == 1
    assert capsys.readouterr().err == (f"{stale} is out of date with the commands' --help: "
                                       f"run `python scripts/cli_docs.py > docs/cli.md`\n")
    stale.write_text(cli_docs.render(), encoding="utf-8")
    assert cli_docs.main(["--check", str(stale)]) == 0


def test_rendering_ignores_the_terminal(monkeypatch):
    """The reference does not depend on who regenerates it: the help is wrapped at a fixed width."""
    monkeypatch.setenv("COLUMNS", "200")
    wide = cli_docs.render()
    monkeypatch.setenv("COLUMNS", "50")
    assert cli_docs.render() == wide


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(path):
    """`PROG [CMD] --help` works and shows an invocation of that very command, so a newcomer can copy one."""
    prog, *names = path.split()
    result = CliRunner().invoke(cli_docs.command_groups()[prog], [*names, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output and re.search(rf"^\s+{re.escape(path)}(\s|$)", result.output, re.MULTILINE), \
        f"`{path} --help` has no example of `{path}`"


@pytest.mark.parametrize("doc", ["README.md", "docs/cli.md"])
def test_docs_show_only_commands_and_flags_that_exist(doc):
    """Every `bertprep`/`berttrain` command and flag shown in the README, in the commands' help examples and in the
    notes of docs/cli.md exists, so copying one never fails on a renamed option."""
    assert shown_problems((ROOT / doc).read_text(encoding="utf-8")) == []


def test_shown_command_check_catches_unknown_commands_and_flags():
    """The check above can fail: it reads fenced blocks, prompts, module invocations and inline code."""
    markdown = "\n".join([
        "Run `bertprep shard --max-lenght 16` or `bertprep …`, not `bertprep.egg-info`.",
        "```bash",
        "bertprep vocab -i x.txt --vocab-size 100   # --not-parsed in a comment",
        ".venv/bin/berttrain run --shards d --steps=4 --no-such-flag | tee log",
        "$ berttrain trian --run r",
        "torchrun --nproc_per_node 2 -m train run --shards d -x",
        "python -m prep peek data/x -n 2 --row -1",
        "Usage: bertprep [OPTIONS] COMMAND [ARGS]...",
        "```",
        "1. In a list:",
        "   ```bash",
        "   bertprep verify data/x --deep",
        "   ```",
    ])
    assert shown_problems(markdown) == [
        "berttrain run has no option --no-such-flag: .venv/bin/berttrain run --shards d --steps=4 --no-such-flag "
        "| tee log",
        "berttrain has no command 'trian': $ berttrain trian --run r",
        "berttrain run has no option -x: torchrun --nproc_per_node 2 -m train run --shards d -x",
        "bertprep verify has no option --deep: bertprep verify data/x --deep",
        "bertprep shard has no option --max-lenght: bertprep shard --max-lenght 16",
    ]
