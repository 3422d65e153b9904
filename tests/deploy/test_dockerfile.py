"""Dockerfile and .dockerignore, linted without a Docker engine."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"
SOURCE_PACKAGES = ("app", "models", "training")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY...
    args: str  # the rest of the (joined) line


@dataclass
class Stage:
    image: str  # as written, after ${ARG} substitution
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def find(self, keyword: str) -> list[tuple[int, Instruction]]:
        return [(i, ins) for i, ins in enumerate(self.instructions) if ins.keyword == keyword]


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, `\\` continuations joined."""
    instructions = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments may sit inside a continuation too
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def parse_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (those before the first FROM) and the build stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in parse_instructions(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m[1]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            assert ins.keyword == "ARG", f"only ARG may precede the first FROM, not {ins.keyword}"
            key, _, value = ins.args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    argv = json.loads(args)
    assert isinstance(argv, list), args
    return argv


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for _, ins in stage.find("ENV"):
        for word in shlex.split(ins.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def copy_sources(ins: Instruction) -> list[str]:
    """Sources of a COPY from the build context (empty for COPY --from)."""
    words = shlex.split(ins.args)
    if any(w.startswith("--from=") for w in words):
        return []
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def build(stages: list[Stage]) -> Stage:
    """The stage that installs the package: the one that copies pyproject.toml."""
    (stage,) = [s for s in stages if any("pyproject.toml" in i.args for _, i in s.find("COPY"))]
    return stage


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_parser_reads_continuations_and_stage_names() -> None:
    text = "ARG BASE=img:1.0\n# c\nFROM ${BASE} AS one\nRUN a \\\n  # inside\n  && b\nFROM one\n"
    global_args, parsed = parse_stages(text)
    assert global_args == {"BASE": "img:1.0"}
    assert [(s.image, s.name) for s in parsed] == [("img:1.0", "one"), ("one", None)]
    assert parsed[0].instructions == [Instruction("RUN", "a && b")]


def test_is_multi_stage(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    earlier = {s.name for s in stages[:-1]}
    copied_from = {
        word.removeprefix("--from=")
        for _, ins in final.find("COPY")
        for word in ins.args.split()
        if word.startswith("--from=")
    }
    assert copied_from & earlier, "the runtime stage should copy its install from a build stage"


def test_base_images_are_pinned_by_tag(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.image in names:
            continue
        reference = stage.image.split("@")[0]
        repository, _, tag = reference.rpartition(":")
        assert repository and "/" not in tag, f"{stage.image}: pin the base image by tag"
        assert tag != "latest", f"{stage.image}: `latest` moves; pin a version"


def test_base_is_a_cuda_pytorch_runtime_whose_torch_fits_pyproject(final: Stage) -> None:
    match = re.fullmatch(
        r"pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", final.image
    )
    assert match, f"{final.image} is not a pytorch/pytorch CUDA runtime tag"
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    # Outside the range, pip would replace the base image's CUDA torch with a download.
    assert torch.specifier.contains(Version(match["torch"])), (match["torch"], str(torch))


def test_dependencies_are_installed_before_the_source_is_copied(build: Stage) -> None:
    copies = build.find("COPY")
    runs = build.find("RUN")
    pyproject_at = next(i for i, ins in copies if "pyproject.toml" in copy_sources(ins))
    source_at = min(
        i
        for i, ins in copies
        if any(src.rstrip("/").split("/")[0] in SOURCE_PACKAGES for src in copy_sources(ins))
    )
    deps_at = [i for i, ins in runs if "pip install" in ins.args and pyproject_at < i < source_at]
    assert deps_at, "install the dependencies between COPY pyproject.toml and COPY of the source"
    package_installs = [ins.args for i, ins in runs if i > source_at and "pip install" in ins.args]
    assert package_installs, "install the package itself after copying the source"
    assert all(" -e " not in args and "--editable" not in args for args in package_installs)


def test_copies_everything_pip_needs_to_build_the_package(build: Stage) -> None:
    copied = {src.rstrip("/") for _, ins in build.find("COPY") for src in copy_sources(ins)}
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    readme = project.get("readme")
    needed = {"pyproject.toml", *SOURCE_PACKAGES}
    if isinstance(readme, str):  # setuptools reads it while building the wheel
        needed.add(readme)
    assert needed <= copied, needed - copied


def test_runs_as_a_non_root_user(final: Stage) -> None:
    users = final.find("USER")
    assert users, "the runtime stage needs a USER"
    last_user_at, last_user = users[-1]
    assert last_user.args.split(":")[0] not in ("root", "0")
    cmd_at = final.find("CMD")[-1][0]
    assert last_user_at < cmd_at


def test_healthcheck_asks_readiness_without_curl(final: Stage) -> None:
    (healthcheck,) = [ins.args for _, ins in final.find("HEALTHCHECK")]
    assert healthcheck.upper() != "NONE"
    argv = exec_form(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    assert argv[:2] == ["python", "-c"]
    assert "urllib" in argv[2]
    assert "/readyz" in argv[2]
    assert not {"curl", "wget"} & set(re.findall(r"\w+", healthcheck))


def test_exposes_port_8000(final: Stage) -> None:
    exposed = {port for _, ins in final.find("EXPOSE") for port in ins.args.split()}
    assert exposed & {"8000", "8000/tcp"}


def test_starts_the_service_configured_from_the_environment(final: Stage) -> None:
    assert exec_form(final.find("CMD")[-1][1].args) == ["python", "-m", "app"]
    env = env_of(final)
    assert env["VAE_HOST"] == "0.0.0.0"
    assert env.get("VAE_PORT", "8000") == "8000"


def test_never_adds_urls(stages: list[Stage]) -> None:
    for stage in stages:
        for _, ins in stage.find("ADD"):
            assert not re.search(r"\b(https?|ftp|git)://|git@", ins.args), ins.args


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


def test_dockerignore_keeps_what_the_build_copies(
    build: Stage, ignore_rules: list[tuple[bool, re.Pattern[str]]]
) -> None:
    for _, ins in build.find("COPY"):
        for source in copy_sources(ins):
            source = source.rstrip("/")
            assert not is_ignored(source, ignore_rules), source
            if source in SOURCE_PACKAGES:
                assert not is_ignored(f"{source}/module.py", ignore_rules), source


def test_healthcheck_start_period_is_compose_s(final: Stage) -> None:
    import yaml

    (healthcheck,) = [ins.args for _, ins in final.find("HEALTHCHECK")]
    start_period = re.search(r"--start-period=(\S+)", healthcheck)
    assert start_period, healthcheck
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    # A first start trains before anything listens: as long in a `docker run` as in compose.
    assert start_period[1] == compose["services"]["api"]["healthcheck"]["start_period"]


def test_the_volume_mount_points_belong_to_the_service_user(final: Stage) -> None:
    # Docker copies a mount point's owner into an empty named volume: the non-root user must
    # own /checkpoints (trained models) and /data (downloaded MNIST) to write them.
    runs = " ".join(ins.args for _, ins in final.find("RUN"))
    chown = re.search(r"chown (\S+) ([^&]+)", runs)
    assert chown, runs
    assert {"/checkpoints", "/data"} <= set(chown[2].split())
    owner = chown[1].split(":")[0]
    uid = re.search(rf"--uid (\d+) .*\b{owner}\b", runs)  # useradd ... --uid N ... <owner>
    assert uid and final.find("USER")[-1][1].args.split(":")[0] == uid[1]
