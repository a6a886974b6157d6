"""README.md cannot rot: every shell command and Python block in it runs here, in README order, in
one scratch folder (so `runs/default` of the main job is what `zoo.predict --workdir
runs/default` reads), and the outputs it shows are checked against what the commands print.

Long commands run with the small overrides of SMALL (stated below, appended to the command);
`pip install` and `python -m pytest` are what `.ci/run` runs, so they are checked against it
instead of run here. The shell blocks of docs/guide.md (GPU hosts, SLURM, TPU pods, downloads
that need internet) are checked for syntax only, and its Python blocks compile.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 350

# Logical command (its start) -> arguments appended to it here. Everything else runs as written.
SMALL = {
    "python train.py --config=configs/resnet20_fashion_mnist.py": "--config.total_steps=3",
    "python train.py --config=configs/binary_footwear.py": "--config.total_steps=3",
    "python train.py --config=configs/multilabel_mosaic.py": "--config.total_steps=3",
    "python train.py --config=configs/finetune_efficientnet_lite0_folder.py": (
        "--config.total_steps=2"
    ),
    "python train.py --config=configs/simclr_fashion_mnist_mini.py": (
        "--config.total_steps=3 --config.evals.names=knn"
    ),
    "python -m zoo.evaluate --workdir runs/simclr": "--json runs/simclr/evaluate.json",
    "python -m zoo.compare": (
        "--models=resnet20 --config.total_steps=3 --config.data.name=fashion_mnist_mini"
    ),
    "python benchmarks/throughput.py": (
        "--models resnet20 --modes infer --infer-batch 8 --warmup 1 --max-warmup 1 --steps 1"
        " --pause 0 --same-process"
    ),
    "python train.py --workdir=runs/two_processes": (
        "--config.total_steps=4 --config.evals.every_steps=4 --config.checkpoint.every_steps=4"
    ),
    "python train.py --config=configs/deit_small_imagenet.py:runlocal": "",  # 3 steps already
    "python train.py": (  # the main job (the longest matching start wins)
        "--workdir=runs/default --config.total_steps=40 --config.evals.every_steps=20"
        " --config.checkpoint.every_steps=20"
    ),
}


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, section) of every fenced block, in order; `section` counts the `## `
    headings before it."""
    return [
        (m.group(1), m.group(2), len(re.findall(r"^## ", text[: m.start()], flags=re.M)))
        for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)
    ]


def logical_commands(code: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for line in code.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def without_comment(command: str) -> str:
    return re.sub(r"\s+#\s.*$", "", command)


def runnable(command: str, ci_script: str) -> tuple[str, bool]:
    """`command` as the test runs it, and whether it was shortened: CI's commands checked
    against .ci/run and replaced by `true`, long ones given SMALL's overrides."""
    shortened = False
    command = without_comment(command)
    parts = [part.strip() for part in command.split("&&")]
    for i, part in enumerate(parts):
        if part.startswith("pip install"):
            extras = re.search(r"\[([\w,]+)\]", part)
            ci_install = re.search(r"pip install -q -e '\.\[([\w,]+)\]'", ci_script)
            assert ci_install, ".ci/run no longer installs zoo with its extras"
            if extras:  # the README's extras are a subset of what CI installs
                assert set(extras.group(1).split(",")) <= set(ci_install.group(1).split(","))
            parts[i] = "true"
        elif part.startswith("python -m pytest"):
            assert re.search(r"^python -m pytest\b", ci_script, flags=re.M), (
                ".ci/run must run the README's test command"
            )
            parts[i] = "true"
        else:
            key = max((k for k in SMALL if part.startswith(k)), key=len, default=None)
            if key is not None and SMALL[key]:
                shortened = True
                background = part.endswith("&")
                part = part.removesuffix("&").rstrip()
                parts[i] = f"{part} {SMALL[key]}" + (" &" if background else "")
    return " && ".join(parts), shortened


def line_pattern(line: str, exact: bool) -> str:
    """A regex for one line of a ```text block: the line itself (`.../` standing for any
    folder), or, when the test ran the command shorter than the README's figure, the line with
    its numbers free and, in a ranking (`  1. Trouser (100.0%)`), its label free."""
    pattern = re.escape(line).replace(re.escape(".../"), "(.*/)?")
    if exact:
        return pattern
    ranked = re.fullmatch(r"(\s+)\d+\. .+ \(\d+\.\d%\)", line)
    if ranked:
        return ranked.group(1) + r"\d+\. .+ \(\d+\.\d%\)"
    return re.sub(r"\d+(\\\.\d+)?", lambda _: r"\d+(\.\d+)?", pattern)


README_TEXT = README.read_text()
BLOCKS = fenced_blocks(README_TEXT)
RUN_BLOCKS = [
    (i, lang, code) for i, (lang, code, _) in enumerate(BLOCKS) if lang in ("bash", "python")
]


def block_id(block: tuple[int, str, str]) -> str:
    i, lang, code = block
    first = next(line for line in code.splitlines() if line and not line.startswith("import"))
    return f"{i:02d}-{lang}-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', first)[:40]}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The folder the README's commands run in: the repository's entry points and configs
    linked in, nothing else."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ["train.py", "predict.py", "configs", "scripts", "benchmarks"]:
        (folder / name).symlink_to(REPO / name)
    return folder


def user_env() -> dict[str, str]:
    """A user's shell: one CPU device (not conftest's 8), the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def text_after(index: int) -> tuple[str, ...]:
    """The ```text blocks that follow block `index` in its section, before the next runnable
    block: what the README shows the commands print."""
    shown = []
    for lang, code, section in BLOCKS[index + 1 :]:
        if lang in ("bash", "python") or section != BLOCKS[index][2]:
            break
        if lang == "text":
            shown.append(code)
    return tuple(shown)


def test_readme_is_short_and_every_fence_has_a_language():
    assert len(README_TEXT.splitlines()) <= MAX_README_LINES
    assert {lang for lang, _, _ in BLOCKS} <= {"bash", "python", "text"}, (
        "a fence without a language"
    )


def test_every_long_command_is_still_in_the_readme():
    commands = [c for _, lang, code in RUN_BLOCKS if lang == "bash" for c in logical_commands(code)]
    commands = [p.strip() for c in commands for p in without_comment(c).split("&&")]
    for key in SMALL:
        assert any(c.startswith(key) for c in commands), f"SMALL has a stale entry: {key}"


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=block_id)
def test_readme_block_runs(block, scratch):
    index, lang, code = block
    if lang == "python":
        argv, shortened = [sys.executable, "-c", code], False
    else:
        ci_script = (REPO / ".ci/run").read_text()
        commands = [runnable(c, ci_script) for c in logical_commands(code)]
        script = "\n".join(command for command, _ in commands)
        shortened = any(short for _, short in commands)
        argv = ["bash", "-euo", "pipefail", "-c", script]
    done = subprocess.run(
        argv, cwd=scratch, env=user_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (
        f"{shlex.join(argv[-1:])}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    # Exact where the test ran the commands as written, on no workdir that it shortened.
    exact = lang == "bash" and not shortened and "--workdir" not in code
    printed = (done.stdout + done.stderr).splitlines()
    for shown in text_after(index):
        for pattern in (line_pattern(line, exact) for line in shown.splitlines()):
            assert any(re.fullmatch(pattern, line) for line in printed), (
                f"README shows a line the command did not print: {pattern}\n{done.stdout[-3000:]}"
            )


def test_guide_blocks_parse():
    guide = (REPO / "docs/guide.md").read_text()
    for lang, code, _ in fenced_blocks(guide):
        if lang == "python":
            compile(code, "docs/guide.md", "exec")
        elif lang == "bash":
            check = subprocess.run(["bash", "-n", "-c", code], capture_output=True, text=True)
            assert check.returncode == 0, f"{code}\n{check.stderr}"


def section(title: str) -> str:
    start = README_TEXT.index(f"\n## {title}\n")
    end = README_TEXT.find("\n## ", start + 1)
    return README_TEXT[start:end]


def test_model_table_is_what_scripts_model_table_prints():
    """Parameters of every row (traced, not compiled) and, for the 32 px models, the whole
    row as `scripts/model_table.py` computes it (their forward compiles in seconds)."""
    spec = importlib.util.spec_from_file_location("model_table", REPO / "scripts/model_table.py")
    model_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_table)
    rows = re.findall(r"^\| (`\w+`) \| (.+? M) \| ([\d.]+) \| (\d+) \|", section("Models"), re.M)
    assert len(rows) >= 15
    for name, params, gflops, size in rows:
        if size == "32":
            assert model_table.row(name.strip("`"))[:4] == [name, params, gflops, size]
        else:
            assert model_table.params_cell(name.strip("`")) == params, name


def test_links_point_to_files_and_headings_that_exist():
    for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([\w-]+))?\)", README_TEXT):
        path = REPO / target
        assert path.exists(), f"README links to a missing file: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w -]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"README links to a missing heading: {target}#{anchor}"
