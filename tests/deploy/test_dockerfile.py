"""What the real build (tests/deploy/test_image.py) cannot check: the users' default base image,
which CI cannot pull, and what .dockerignore keeps out of the build context."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"


def default_base_image() -> str:
    """The BASE_IMAGE argument's default: the base users build on (CI passes another)."""
    (image,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return image


def test_every_stage_builds_on_the_base_image_argument() -> None:
    stages = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert stages and set(stages) == {"${BASE_IMAGE}"}, stages


def test_the_default_base_is_pinned_by_tag() -> None:
    repository, _, tag = default_base_image().partition("@")[0].rpartition(":")
    assert repository and tag and "/" not in tag, "pin the base image by tag"
    assert tag != "latest", "`latest` moves; pin a version"


def test_the_default_base_is_a_cuda_pytorch_runtime_whose_torch_fits_pyproject() -> None:
    match = re.fullmatch(
        r"pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime",
        default_base_image(),
    )
    assert match, f"{default_base_image()} is not a pytorch/pytorch CUDA runtime tag"
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    # Outside the range, pip would replace the base image's CUDA torch with a download.
    assert torch.specifier.contains(Version(match["torch"])), (match["torch"], str(torch))


def test_never_adds_urls() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ADD "):
            assert not re.search(r"\b(https?|ftp|git)://|git@", line), line


# .dockerignore, matched as Docker does: patterns anchored at the context root, `*` within one
# path segment, `**` across segments, a directory's pattern covering all below it, `!` to
# re-include, the last matching line winning.


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return dockerignore_rules(DOCKERIGNORE.read_text())


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    rules = dockerignore_rules("*.log\n**/*.tmp\ncache/\n!cache/keep\n")
    assert is_ignored("x.log", rules)
    assert not is_ignored("sub/x.log", rules)  # unlike .gitignore, `*.log` is root-only
    assert is_ignored("sub/deep/x.tmp", rules)
    assert is_ignored("cache/a/b", rules)
    assert not is_ignored("cache/keep", rules)


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        "checkpoints/default/model.safetensors",
        "data/MNIST/raw/train-images-idx3-ubyte",
        "runs/default/events.out.tfevents",
        "logs/serve.txt",
        "train.log",
        "app/debug.log",
        ".venv/bin/python",
        "venv/bin/python",
        "app/__pycache__/main.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/app.json",
        ".ruff_cache/content",
        ".hypothesis/examples/x",
        ".env",
    ],
)
def test_dockerignore_keeps_out(
    path: str, ignore_rules: list[tuple[bool, re.Pattern[str]]]
) -> None:
    assert is_ignored(path, ignore_rules)
