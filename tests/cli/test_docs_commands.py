"""Every command that README.md and docs/*.md show runs as shown.

The commands are read from the pages' fenced code blocks (`\\` continuations joined, `# comment` tails dropped):

* `python cli.py fit|validate|test|predict ...` and `multimodal-pretrain ...` (also after `srun`, `torchrun ...`
  or `VAR=value`) run in-process through `cli.main` with `--print_config` appended: every `--config` file is read,
  every override is parsed against the system's and the DataModule's signatures and the config is composed,
  without building a model or reading data. A missing config file, an unknown key or a value the parser rejects
  fails the case; each override that names a key of the printed config must show there with its value. (The
  config is printed before the check that required values are set: a value the config leaves to the user, such
  as the HuBERT folder of configs/speech/librispeech_hubert.yaml, need not be given.)
* `export`, `export-hf` and `consolidate` parse their arguments and stop at the checkpoint, which does not exist;
  `curate` parses its arguments.
* `python -m datamodules.image.shards.write` converts a generated five-image COCO set.

Substitutions, the only ones: the commands run in an empty folder (`tmp_path`), so that paths such as
`runs/.../last.ckpt` name nothing and nothing is written into the clone, and `configs/...` is made absolute
(the repository's); for the shard converter `/data/coco` and `/data/coco_shards/...` become the generated set
and a folder in `tmp_path`, and `--workers` becomes 0 (five images need no processes). `/data/...` paths of
the CLI commands stay as they are: printing a config opens none of them.

Also: every file of the repository that the pages name (`configs/...yaml`, `benchmarks/...py`, `tests/...py`, ...)
and every entry of the README's Layout listing exists; every relative link names a file that exists and, after
`#`, a heading of it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import cli
from cli import CheckpointError
from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


@dataclass(frozen=True)
class Command:
    page: str  # README.md or docs/<page>.md
    line: int  # where the command starts
    kind: str  # "cli" (cli.py / multimodal-pretrain) or "shard_writer"
    args: tuple[str, ...]  # the arguments after the program

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The fenced code blocks of a Markdown text (indented ones in list items too): (first line number, lines)."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


# a command of ours: `python cli.py`, `torchrun ... cli.py`, the console script, or `python -m` of a module of ours
PROGRAM = re.compile(
    r"(^|\s)(python3? cli\.py|torchrun\s.*\scli\.py|multimodal-pretrain|python3? -m datamodules\.\S+)\s"
)


def shell_lines(start: int, lines: list[str]) -> list[tuple[int, list[str]]]:
    """The block's commands of ours as shell words, lines ending in `\\` joined, comments dropped: (line number,
    words). Other lines (a layout listing, a job script's `#SBATCH` header) are left out."""
    commands, pending, first = [], "", start
    for number, line in enumerate(lines, start):
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        if PROGRAM.search(logical.split(" #")[0]):
            commands.append((first, shlex.split(logical, comments=True)))
    return commands


def commands_of(page: Path) -> list[Command]:
    found = []
    rel = str(page.relative_to(REPO))
    for start, lines in code_blocks(page.read_text(encoding="utf-8")):
        for line, words in shell_lines(start, lines):
            if "cli.py" in words:  # after python, python3 or torchrun's options
                found.append(Command(rel, line, "cli", tuple(words[words.index("cli.py") + 1 :])))
            elif "multimodal-pretrain" in words:
                found.append(
                    Command(rel, line, "cli", tuple(words[words.index("multimodal-pretrain") + 1 :]))
                )
            elif "datamodules.image.shards.write" in words:
                at = words.index("datamodules.image.shards.write")
                found.append(Command(rel, line, "shard_writer", tuple(words[at + 1 :])))
    return found


def unique(commands: list[Command]) -> list[Command]:
    """One case per distinct command (the README and a page may show the same one), named by where it first is."""
    first: dict[tuple, Command] = {}
    for c in commands:
        first.setdefault((c.kind, c.args), c)
    return list(first.values())


COMMANDS = [c for page in PAGES for c in commands_of(page)]
CLI_COMMANDS = unique([c for c in COMMANDS if c.kind == "cli"])


def with_repo_configs(args: tuple[str, ...]) -> list[str]:
    """`configs/...` (alone or after `=`) as the repository's absolute path: the commands run in tmp_path."""
    return [re.sub(r"(^|=)configs/", rf"\g<1>{REPO}/configs/", a) for a in args]


def overrides(args: list[str]) -> list[tuple[str, str]]:
    """(dotted key, value) of each `--key value` / `--key=value` override but --config and --print_config."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and arg not in ("--config", "--print_config"):
            key, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            if not key.endswith("+"):  # `--trainer.callbacks+=...` appends: no single value to compare
                pairs.append((key, value))
        i += 1
    return pairs


def lookup(config: dict, key: str) -> tuple[bool, object]:
    """The value at a dotted key of a printed config; `model.x` also finds `model.init_args.x` (subclass mode)."""
    node: object = config
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and isinstance(node.get("init_args"), dict) and part in node["init_args"]:
            node = node["init_args"][part]
        else:
            return False, None
    return True, node


def same(printed: object, given: str) -> bool:
    """A printed value is the one given: as YAML reads it (`true`, `[a, b]`, `-10`), or as the text itself (a
    union with `str` keeps `--trainer.devices 8` as "8")."""
    try:
        read = yaml.safe_load(given)
    except yaml.YAMLError:
        read = given
    return printed in (read, given)


class ParserOnceCLI(cli.PretrainCLI):
    """PretrainCLI that builds its parser once per test session and reuses it: building it reads the signatures
    and docstrings of every class (a second or two); parsing a command takes a fraction of that."""

    cached: tuple | None = None

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        if ParserOnceCLI.cached is None:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            ParserOnceCLI.cached = (self.parser, self._subcommand_method_arguments)
        self.parser, self._subcommand_method_arguments = ParserOnceCLI.cached
        # a --print_config read by a command that failed later would be left on the parser
        if hasattr(self.parser, "print_config"):
            del self.parser.print_config


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMPRETRAIN_DEBUG", raising=False)
    monkeypatch.setattr(cli, "PretrainCLI", ParserOnceCLI)
    monkeypatch.setattr("sys.argv", ["cli.py"])  # LightningCLI warns when sys.argv holds pytest's arguments
    return tmp_path


def test_the_pages_show_commands() -> None:
    """The extraction finds the commands the README's tour shows, and every page with a code block has some."""
    readme = [c.args for c in CLI_COMMANDS if c.page == "README.md"]
    assert ("fit", "--config", "configs/mlm/quickstart.yaml") in readme
    assert {a[0] for a in readme} >= {"fit", "test", "predict"}
    kinds = {c.args[0] for c in CLI_COMMANDS}
    assert kinds >= {"fit", "test", "predict", "export", "export-hf", "consolidate"}
    torchrun = [
        c for c in CLI_COMMANDS if c.page == "docs/scale-and-gpus.md" and "--trainer.num_nodes" in c.args
    ]
    assert torchrun, "the torchrun and SLURM commands of docs/scale-and-gpus.md"


def test_extraction_joins_continuations_and_drops_comments() -> None:
    block = [
        "srun python cli.py fit --config a.yaml \\",
        "    --data.x '[/d/a b.txt, /d/c.txt]'  # a comment",
    ]
    assert shell_lines(7, block) == [
        (7, ["srun", "python", "cli.py", "fit", "--config", "a.yaml", "--data.x", "[/d/a b.txt, /d/c.txt]"])
    ]
    assert same("8", "8") and same(8, "8") and same([1.0], "[1]") and not same("siglip", "infonce")
    assert overrides(["fit", "--config", "a.yaml", "--data.root", "/d", "--trainer.devices=8", "--x+=y"]) == [
        ("data.root", "/d"),
        ("trainer.devices", "8"),
    ]


@pytest.mark.parametrize("command", CLI_COMMANDS, ids=[c.id for c in CLI_COMMANDS])
def test_cli_command_parses(command: Command, in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    args = with_repo_configs(command.args)
    if args[0] in LIGHTNING_SUBCOMMANDS:
        helps = any(a in ("-h", "--help") or a.endswith(".help") for a in args)
        asks = args if helps or "--print_config" in args else [*args, "--print_config"]
        with pytest.raises(SystemExit) as exit_:
            cli.main(asks, friendly_errors=True)
        out, err = capsys.readouterr()
        assert exit_.value.code == 0, f"{command.id}: {' '.join(command.args)}\n{err.strip()[-2000:]}"
        if helps:
            assert "usage:" in out
            return
        config = yaml.safe_load(out)
        assert {"model", "data", "trainer"} <= config.keys()
        for key, value in overrides(args):
            found, printed = lookup(config, key)
            assert not found or same(printed, value), f"{command.id}: --{key} {value} printed as {printed!r}"
    elif args[0] == "curate":  # its steps read data the pages name under /data: their arguments parse
        from lightning_modules.curation import curate_parser

        curate_parser().parse_args(args[1:])
    else:
        assert args[0] in cli.COMMANDS, f"{command.id}: unknown command {args[0]}"
        ckpt = args[args.index("--ckpt_path") + 1]
        # the arguments parse (argparse would exit with status 2); the run stops at the missing checkpoint
        with pytest.raises(CheckpointError, match="does not exist") as error:
            cli.main(args, friendly_errors=False)
        assert ckpt in str(error.value)
        assert not any(in_tmp.iterdir()), "nothing is written"


WEBDATASET_COMMANDS = unique([c for c in COMMANDS if c.kind == "shard_writer"])


@pytest.mark.parametrize("command", WEBDATASET_COMMANDS, ids=[c.id for c in WEBDATASET_COMMANDS])
def test_webdataset_converter_command_runs(command: Command, tmp_path: Path) -> None:
    from datamodules.image.shards.write import main
    from datamodules.synthetic.shapes import generate_shapes_coco

    coco = generate_shapes_coco(tmp_path / "coco", n_train=5, n_val=1, image_size=16)
    args = [
        a.replace("/data/coco_shards", str(tmp_path / "shards")).replace("/data/coco", str(coco))
        for a in command.args
    ]
    if "--workers" in args:
        args[args.index("--workers") + 1] = "0"
    info = main(args)
    out = Path(args[args.index("--out") + 1])
    assert info["num_samples"] == 5
    assert sorted(p.name for p in out.glob("*.tar")) == ["coco-000000.tar"]


# a file of the repository named in a page's text or commands: a config, a benchmark, a test, a module
NAMED_FILE = re.compile(
    r"(?<![\w/.])((?:configs|benchmarks|tests|lightning_modules|datamodules|notebooks)/[\w./-]*\.(?:yaml|py|ipynb|sh))"
)


def test_named_files_exist() -> None:
    named = {(page, m) for page in PAGES for m in NAMED_FILE.findall(page.read_text(encoding="utf-8"))}
    assert (REPO / "README.md", "configs/mlm/quickstart.yaml") in named
    missing = sorted(
        f"{page.relative_to(REPO)}: {name}" for page, name in named if not (REPO / name).is_file()
    )
    assert not missing, missing


def layout_paths(readme: str) -> list[str]:
    """The files and folders of the README's Layout listing, as paths from the repository root: a line at the left
    names a top-level entry; a line indented by two names entries of the last top-level folder (`text/`,
    `components/encoder.py`, `optim.py, rng.py`); deeper lines continue a description."""
    heading = readme.splitlines().index("## Layout") + 1
    _, lines = next(b for b in code_blocks(readme) if b[0] > heading)
    paths, folder = [], ""
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent > 2:
            continue
        words = line.split()
        names = [words[0]]
        while names[-1].endswith(","):
            names.append(words[len(names)])
        names = [n.rstrip(",") for n in names]
        if indent == 0:
            folder = names[0] if names[0].endswith("/") else ""
            paths += names
        else:
            paths += [folder + n for n in names]
    return paths


def test_layout_names_what_exists() -> None:
    paths = layout_paths((REPO / "README.md").read_text(encoding="utf-8"))
    assert {"cli.py", "lightning_modules/components/encoder.py", "datamodules/text/", "docs/"} <= set(paths)
    assert not [p for p in paths if not (REPO / p).exists()]


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lowercase, punctuation but hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    in_code = False
    found = set()
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#+ (.*)", line)):
            found.add(slug(m.group(1)))
    return found


LINKS = [
    (page, target)
    for page in PAGES
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8"))
    if "://" not in target
]


def test_links_resolve() -> None:
    assert any(target.startswith("docs/") for page, target in LINKS if page.name == "README.md")
    readme_docs = {(REPO / t).resolve() for p, t in LINKS if p.name == "README.md" and t.startswith("docs/")}
    assert readme_docs >= {p.resolve() for p in PAGES[1:]}, "the README links every page of docs/"
    for page, target in LINKS:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.is_file(), f"{page.relative_to(REPO)}: link {target}: no file {file}"
        if anchor:
            assert anchor in anchors(file), f"{page.relative_to(REPO)}: link {target}: no heading #{anchor}"
