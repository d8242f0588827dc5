"""The documents match the CLI: every ``jewelclf ...`` command in README.md and docs/*.md parses
with the options of ``jewelclf.cli.main``, relative links and ``#anchor``s resolve, and the
README stays a user guide (at most 300 lines, the two set-up commands first).

Commands come from fenced code blocks (bash, sh, shell, console or unlabelled) and from inline
code spans that start with ``jewelclf ``. Only option names and the values of choice options are
checked; positional arguments (paths, placeholders such as DATA) are not.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from jewelclf.cli import main

from conftest import REPO

ROOT = REPO
README = ROOT / "README.md"
SETUP_COMMANDS = [
    "pip install -e . && jewelclf fit ../shared/data/jewellery --config "
    "experiments/quick_mobilenet.yaml --weights ../shared/weights/mobilenet_0.25_224_imagenet_notop.h5 "
    "--run-dir runs/quick --overwrite",
    'pip install -e ".[dev]" && ruff check . && python -m pytest -q',
]
COMMAND_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK_DOCS = [*COMMAND_DOCS, ROOT / "BENCHMARKS.md", ROOT / "TESTING.md"]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
MAX_README_LINES = 300


# ------------------------------------------------------------------------------ markdown
@dataclass
class Block:
    lang: str
    start: int  # line number (1-based) of the block's first content line
    lines: list[str]


_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^`\s]*)")


def split_markdown(text: str) -> tuple[list[Block], str]:
    """Fenced blocks, and the text outside them with every fenced line blanked (so that
    offsets in it still give the right line numbers)."""
    blocks: list[Block] = []
    prose: list[str] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            blocks.append(Block(m.group(2).lower(), number + 1, []))
            prose.append("")
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            else:
                blocks[-1].lines.append(line)
            prose.append("")
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n\s*\n).)+?)(?<!`)\1(?!`)", re.S)  # not across paragraphs


def code_spans(prose: str):
    """(line number, content) of every inline code span; a span may run over a line break."""
    for m in _CODE_SPAN.finditer(prose):
        yield prose.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split())


def without_code_spans(prose: str) -> str:
    return _CODE_SPAN.sub(lambda m: " " + "\n" * m.group(0).count("\n"), prose)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation other than ``-`` and
    ``_`` dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose.splitlines():
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


# ------------------------------------------------------------------------------ shell lines
def logical_lines(block: Block):
    """(line number, text) of each command line, backslash continuations joined."""
    pending, start = "", None
    for number, line in enumerate(block.lines, start=block.start):
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending, start = "", None
    if pending:
        yield start, pending


def shell_segments(line: str) -> list[list[str]]:
    """Split a shell line into the words of each simple command: quotes respected, ``#``
    comments dropped, commands separated by ``&&``, ``||``, ``;`` and a ``|`` that starts a
    word (a ``|`` inside a word, as in ``savedmodel|tflite``, is a usage synopsis)."""
    segments: list[list[str]] = [[]]
    word: str | None = None
    quote: str | None = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and i + 1 < len(line):
                i += 1
                word += line[i]
            else:
                word += c
        elif c in "'\"":
            quote, word = c, (word or "")
        elif c == "\\" and i + 1 < len(line):
            i += 1
            word = (word or "") + line[i]
        elif c.isspace():
            if word is not None:
                segments[-1].append(word)
            word = None
        elif c == "#" and word is None:
            break
        elif line.startswith(("&&", "||"), i) or c == ";" or (c == "|" and word is None):
            if word is not None:
                segments[-1].append(word)
            word = None
            segments.append([])
            i += 2 if line.startswith(("&&", "||"), i) else 1
            continue
        else:
            word = (word or "") + c
        i += 1
    if word is not None:
        segments[-1].append(word)
    return [s for s in segments if s]


_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PREFIXES = {"time", "/usr/bin/time", "sudo", "exec", "nohup", "env"}


def jewelclf_args(words: list[str]) -> list[str] | None:
    """The arguments after ``jewelclf`` when these words invoke it, else None. Environment
    assignments (``TF_CONFIG='...' jewelclf ...``) and wrappers such as ``time`` are skipped."""
    i = 0
    while i < len(words) and (_ASSIGNMENT.match(words[i]) or words[i] in _PREFIXES):
        i += 1
    if i < len(words) and words[i] == "jewelclf":
        return words[i + 1:]
    if words[i:i + 3] == ["python", "-m", "jewelclf"]:
        return words[i + 3:]
    return None


@dataclass
class Command:
    where: str  # file:line
    text: str
    args: list[str]


def commands_in(path: Path, root: Path = ROOT) -> list[Command]:
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(root).as_posix()
    blocks, prose = split_markdown(text)
    found: list[Command] = []
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for number, line in logical_lines(block):
            line = re.sub(r"^\s*[$>]\s+", "", line)  # a console prompt
            for words in shell_segments(line):
                args = jewelclf_args(words)
                if args is not None:
                    found.append(Command(f"{name}:{number}", " ".join(words), args))
    for number, span in code_spans(prose):
        if span.startswith("jewelclf "):
            span = span.replace("\\|", "|")  # a pipe escaped inside a table cell
            for words in shell_segments(span):
                args = jewelclf_args(words)
                if args is not None:
                    found.append(Command(f"{name}:{number}", " ".join(words), args))
    return found


# ------------------------------------------------------------------------------ the CLI
def _is_placeholder(value: str) -> bool:
    """A value that stands for one: ``NAME``, ``PATH...``, ``$D``, ``<x>``, ``a|b``, ``...``."""
    return ("|" in value or value.startswith("$") or value.strip(".") == ""
            or bool(re.fullmatch(r"[A-Z][A-Z0-9_-]*(\.\.\.)?", value))
            or (value.startswith("<") and value.endswith(">")))


def _clean(token: str) -> str:
    """A word of a usage synopsis without its brackets: ``[--output`` -> ``--output``."""
    return token.lstrip("[").rstrip("]")


def _options(command: click.Command, parent: click.Context) -> dict[str, click.Option]:
    ctx = click.Context(command, parent=parent, info_name=command.name)
    out: dict[str, click.Option] = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            for opt in [*param.opts, *param.secondary_opts]:
                out[opt] = param
    return out


def _option_words(token: str) -> list[str]:
    """``--fast/--no-fast`` names two options; anything else is one word."""
    if token.startswith("--") and "/--" in token:
        return token.split("/")
    return [token]


def check_command(args: list[str]) -> list[str]:
    """What is wrong with ``jewelclf ARGS`` against the CLI: unknown commands and options, and
    values outside a choice option's choices. An empty list when it parses."""
    root_ctx = click.Context(main, info_name="jewelclf")
    tokens = [t for t in (_clean(a) for a in args) if t]
    group_options = _options(main, None)
    i = 0
    while i < len(tokens) and tokens[i].startswith("-"):
        if tokens[i] not in group_options:
            return [f"unknown option {tokens[i]} of jewelclf"]
        if tokens[i] in ("--help", "-h", "--version"):
            return []
        i += 1
    if i == len(tokens):
        return []
    name = tokens[i]
    command = main.commands.get(name)
    if command is None:
        return [f"unknown command {name!r} (jewelclf has {', '.join(sorted(main.commands))})"]
    options = _options(command, root_ctx)
    problems: list[str] = []
    rest = tokens[i + 1:]
    j = 0
    while j < len(rest):
        token = rest[j]
        j += 1
        if token == "--":
            break
        if not token.startswith("-") or token == "-" or re.fullmatch(r"-\d+(\.\d+)?", token):
            continue  # a positional argument, or a value
        for word in _option_words(token):
            opt_name, _, inline = word.partition("=")
            option = options.get(opt_name)
            if option is None:
                problems.append(f"unknown option {opt_name} of `jewelclf {name}`")
                continue
            if option.is_flag or option.count or "/--" in token:
                continue
            if inline:
                values = [inline]
            else:
                values = rest[j:j + option.nargs]
                j += len(values)
            if isinstance(option.type, click.Choice):
                for value in values:
                    if not _is_placeholder(value) and value not in option.type.choices:
                        problems.append(f"{opt_name} {value!r} of `jewelclf {name}` is not one of "
                                        f"{', '.join(map(str, option.type.choices))}")
    return problems


def command_failures(paths, root: Path = ROOT) -> list[str]:
    failures = []
    for path in paths:
        for c in commands_in(path, root):
            failures += [f"{c.where}: {p}\n    {c.text}" for p in check_command(c.args)]
    return failures


def link_failures(paths, root: Path = ROOT) -> list[str]:
    failures = []
    anchor_cache: dict[Path, set[str]] = {}
    for path in paths:
        _, prose = split_markdown(path.read_text(encoding="utf-8"))
        prose = without_code_spans(prose)
        name = path.relative_to(root).as_posix()
        for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            where = f"{name}:{prose.count(chr(10), 0, m.start()) + 1}"
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / urllib.parse.unquote(file_part)).resolve() if file_part else path
            if not dest.exists():
                failures.append(f"{where}: {target}: no file {os.path.relpath(dest, root)}")
                continue
            if anchor and dest.suffix == ".md":
                if dest not in anchor_cache:
                    anchor_cache[dest] = anchors(dest)
                if urllib.parse.unquote(anchor).lower() not in anchor_cache[dest]:
                    failures.append(f"{where}: {target}: no heading #{anchor} in "
                                    f"{os.path.relpath(dest, root)}")
    return failures


# ------------------------------------------------------------------------------ the tests
def test_every_jewelclf_command_in_the_docs_parses():
    failures = command_failures(COMMAND_DOCS)
    assert not failures, f"{len(failures)} command(s) in the docs do not parse:\n" + "\n".join(failures)


def test_relative_links_and_anchors_resolve():
    failures = link_failures(LINK_DOCS)
    assert not failures, f"{len(failures)} broken link(s):\n" + "\n".join(failures)


def test_readme_is_a_short_user_guide():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, over {MAX_README_LINES}: move reference to docs/ and "
        f"measurements to BENCHMARKS.md")


def test_readme_starts_with_the_two_set_up_commands():
    blocks, _ = split_markdown(README.read_text(encoding="utf-8"))
    bash = [b for b in blocks if b.lang == "bash"]
    assert [b.lines for b in bash[:2]] == [[c] for c in SETUP_COMMANDS], (
        "the first two bash blocks of README.md must be the set-up commands that CI and "
        "the quick start rely on, exactly")


def test_readme_shows_every_command():
    used = {c.args[0] for c in commands_in(README) if c.args and not c.args[0].startswith("-")}
    missing = sorted(set(main.commands) - used)
    assert not missing, f"README.md has no example of: {', '.join(missing)}"


# ------------------------------------------------------------------------------ the checker
@pytest.mark.parametrize("markdown, expected", [
    ("```bash\njewelclf fit DATA --run-dir runs/x --bogus-flag\n```\n", ["unknown option --bogus-flag"]),
    ("```\njewelclf fitt DATA\n```\n", ["unknown command 'fitt'"]),
    ("```sh\njewelclf fit D --run-dir r --class-weight sometimes\n```\n", ["--class-weight 'sometimes'"]),
    ("Run `jewelclf evaluate RUN DATA --splt test` first.\n", ["unknown option --splt"]),
    ("```bash\nTF_CONFIG='{\"a\": 1}' \\\n  jewelclf fit $D --run-dir r --distribute multi_wrker\n```\n",
     ["--distribute 'multi_wrker'"]),
    ("```bash\ncat x | jewelclf predict m --topk 3   # a comment --nope\n```\n", ["unknown option --topk"]),
    ("```console\n$ jewelclf check data/ --json && jewelclf export r --format onnx\n```\n",
     ["--format 'onnx'"]),
])
def test_the_checker_finds_bad_commands(tmp_path, markdown, expected):
    (tmp_path / "x.md").write_text(markdown, encoding="utf-8")
    failures = command_failures_at(tmp_path / "x.md")
    assert len(failures) == len(expected) and all(e in f for e, f in zip(expected, failures)), failures


@pytest.mark.parametrize("markdown", [
    "```bash\nD=../data\njewelclf fit $D --run-dir runs/q --augment --no-augment --precision auto\n```\n",
    "```\njewelclf export RUN_DIR [--format savedmodel|tflite|keras] [--quantize none|int8 ...]\n```\n",
    "```\njewelclf tune DATA --run-dir DIR [--fast/--no-fast] [--tuner NAME]\n```\n",
    "`jewelclf --help` and `jewelclf fit --help`, `jewelclf.cli` and `jewelclf index`'s default\n",
    "| `--x` | see `jewelclf fit --class-weight auto\\|balanced` |\n",
    "```python\nsubprocess.run(['jewelclf', 'fit', '--nope'])\n```\n",
])
def test_the_checker_accepts_good_commands(tmp_path, markdown):
    (tmp_path / "x.md").write_text(markdown, encoding="utf-8")
    assert command_failures_at(tmp_path / "x.md") == []


def command_failures_at(path: Path) -> list[str]:
    return command_failures([path], root=path.parent)


def test_the_link_checker_finds_bad_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The `jewelclf tune` flags\n", encoding="utf-8")
    (tmp_path / "b.md").write_text(
        "[ok](docs/a.md#the-jewelclf-tune-flags) [ok](#b) [bad](docs/a.md#nope) [gone](docs/c.md)\n"
        "`[not a link](nowhere.md)` [web](https://example.com/x#y) ![img](docs/a.md)\n\n# B\n",
        encoding="utf-8")
    failures = link_failures([tmp_path / "b.md"], root=tmp_path)
    assert len(failures) == 2, failures
    assert "#nope" in failures[0] and "docs/c.md" in failures[1]


def test_github_slugs():
    assert github_slug("Hyperparameter search (`jewelclf tune`)") == "hyperparameter-search-jewelclf-tune"
    assert github_slug("`jewelclf fit DATA --run-dir DIR`") == "jewelclf-fit-data---run-dir-dir"
    assert github_slug("A full disk and Keras' own callbacks") == "a-full-disk-and-keras-own-callbacks"
    assert github_slug("gRPC (tensorflow-serving-api)") == "grpc-tensorflow-serving-api"
