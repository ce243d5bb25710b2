"""The docs stay true: every `distill` command line in README.md and docs/ parses with the real argument parser,
every relative link resolves, every experiments/ config named exists, and the front page stays short.

Parsing only parses: nothing is trained, loaded or written. Each check lists every offender as file:line."""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FRONT_PAGE_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CONFIG = re.compile(r"experiments/[\w./-]+\.ya?ml")
PLACEHOLDER = re.compile(r"<[^<>\s]+>")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _split(page: Path):
    """(line number, text, in a fenced code block) for every line of a page."""
    fenced = False
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        yield n, line, fenced


def _command_lines(page: Path):
    """(line number, command) for each `distill ...` command: a fenced line (backslash continuations joined, a
    leading `$ ` dropped) or an inline code span."""
    pending, start = "", 0
    for n, line, fenced in _split(page):
        if fenced:
            text = line.strip()
            if pending:
                text, n = pending + " " + text, start
                pending = ""
            text = text.removeprefix("$ ")
            if text.endswith("\\"):
                pending, start = text[:-1].rstrip(), n
                continue
            if text.startswith("distill "):
                yield n, text
        else:
            for _, span in INLINE_CODE.findall(line):
                if span.strip().startswith("distill "):
                    yield n, span.strip()


def _prose(page: Path):
    """(line number, text outside code) for every line not in a fenced block, inline code spans removed."""
    for n, line, fenced in _split(page):
        if not fenced:
            yield n, INLINE_CODE.sub("", line)


@pytest.fixture(scope="module")
def cli_parser():
    from distill import cli

    return cli.parser()


def _subcommands(parser) -> set[str]:
    import argparse

    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def _parse_error(parser, command: str) -> str | None:
    """Why `command` does not parse, or None. `--help` lines only need their subcommand; a bare `distill <sub>`
    names a command; lines with <placeholders> are not commands."""
    if PLACEHOLDER.search(command):
        return None
    try:
        words = shlex.split(command, comments=True)[1:]
    except ValueError as e:
        return f"shlex: {e}"
    if "--help" in words or "-h" in words or len(words) == 1:
        sub = [w for w in words if not w.startswith("-")]
        return None if not sub or sub[0] in _subcommands(parser) else f"no command {sub[0]!r}"
    try:
        parser.parse_args(words)
    except SystemExit as e:
        return f"exit {e.code}"
    return None


def test_pages_exist():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 10, [_rel(p) for p in PAGES]


def test_distill_command_lines_parse(cli_parser, capsys):
    bad, seen = [], 0
    for page in PAGES:
        for n, command in _command_lines(page):
            seen += 1
            why = _parse_error(cli_parser, command)
            if why:
                err = capsys.readouterr().err.strip().splitlines()
                bad.append(f"{_rel(page)}:{n}: {command!r}: {why}" + (f" ({err[-1]})" if err else ""))
    assert seen > 20, "found too few distill command lines: is the parser of the pages broken?"
    assert not bad, "command lines the CLI does not accept:\n" + "\n".join(bad)


def test_relative_links_resolve():
    bad, seen = [], 0
    for page in PAGES:
        for n, text in _prose(page):
            for target in LINK.findall(text):
                if re.match(r"^(https?:|mailto:|#)", target):
                    continue
                seen += 1
                path = target.split("#", 1)[0]
                if not (page.parent / path).exists():
                    bad.append(f"{_rel(page)}:{n}: {target}")
    assert seen > 50, "found too few links: is the link pattern broken?"
    assert not bad, "links to nothing:\n" + "\n".join(bad)


def test_named_configs_exist():
    bad, seen = [], 0
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for path in CONFIG.findall(line):
                seen += 1
                if not (ROOT / path).is_file():
                    bad.append(f"{_rel(page)}:{n}: {path}")
    assert seen > 20
    assert not bad, "configs that are not in the repository:\n" + "\n".join(bad)


def test_front_page_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= FRONT_PAGE_LINES, f"README.md:{len(lines)}: {len(lines)} lines, at most {FRONT_PAGE_LINES}"


# The checks must catch what they are for.

def test_a_bad_command_is_caught(cli_parser, capsys):
    assert _parse_error(cli_parser, "distill train") is None  # a bare command name
    assert _parse_error(cli_parser, "distill eval runs/x --steps 4  # a comment") is None
    assert _parse_error(cli_parser, "distill <command> --help") is None
    assert _parse_error(cli_parser, "distill export --help") is None
    assert _parse_error(cli_parser, "distill exprt --help")
    assert _parse_error(cli_parser, "distill eval runs/x --stepz 4")
    assert _parse_error(cli_parser, "distill export runs/x")  # --to is required
    capsys.readouterr()


def test_continuations_and_spans_are_read(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("Run `distill plan CONFIG` or:\n\n```bash\n$ distill train a.yaml \\\n    train.max_steps=2\n"
                    "make test\n```\n")
    assert list(_command_lines(page)) == [(1, "distill plan CONFIG"), (4, "distill train a.yaml train.max_steps=2")]
    assert LINK.findall("[a](b.md#x) ![i](c.png) [t](https://x) `[no](code)`") == ["b.md#x", "c.png", "https://x",
                                                                                  "code"]
    assert list(_prose(page))[0] == (1, "Run  or:")
