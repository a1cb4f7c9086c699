"""A Dockerfile linter for this project's image (used by tests/test_cluster_specs.py): the base is a Ray
CUDA image matching requirements.txt, the image installs exactly requirements.txt (and the project
with --no-deps), DeepSpeed can build its ops, it runs as a non-root user, and .dockerignore hides
nothing it copies. Each check returns a list of problems; ``dockerfile_problems`` runs them all."""

from __future__ import annotations

import re
import shlex
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

Instructions = list[tuple[str, str]]

PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f",
                     "--find-links", "-t", "--target", "--prefix", "--root", "--src", "-e", "--editable",
                     "--trusted-host", "--platform", "--python-version", "--implementation", "--abi",
                     "--progress-bar", "-C", "--config-settings", "--global-option", "--no-binary", "--only-binary",
                     "--upgrade-strategy", "--cache-dir", "--log", "--timeout", "--retries", "--proxy", "--cert",
                     "--client-cert", "--report", "--root-user-action"}


def dockerfile_instructions(text: str) -> Instructions:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def requirement_pins(requirements: str) -> dict[str, str]:
    pins = {}
    for line in requirements.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def _shell_commands(run: str) -> Iterator[list[str]]:
    for part in re.split(r"&&|\|\||;|\|", run):
        try:
            tokens = shlex.split(part)
        except ValueError:
            tokens = part.split()
        if tokens:
            yield tokens


def _pip_install_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `install` if this is a pip install (pip, pip3, python -m pip, uv pip)."""
    for i, tok in enumerate(tokens[:-1]):
        if tokens[i + 1] == "install" and (re.fullmatch(r"pip[\d.]*", Path(tok).name)
                                           or (tok == "pip" and i >= 1 and tokens[i - 1] in ("-m", "uv"))):
            return tokens[i + 2:]
    return None


def base_image_problems(instructions: Instructions, pins: dict[str, str]) -> tuple[list[str], str | None]:
    """The base image: Ray's -cuXYZ image (or nvidia/cuda devel), its Ray and Python versions; returns the
    problems and the base's CUDA version (``"128"``) if known."""
    froms = [a.split()[-3] if " AS " in a.upper() else a.split()[-1] for i, a in instructions if i == "FROM"]
    base = froms[-1] if froms else ""
    m = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-cu(?P<cu>\d+)", base)
    if m:
        problems = []
        if m.group("ray") != pins.get("ray"):
            problems.append(f"base image Ray {m.group('ray')} != requirements.txt ray=={pins.get('ray')}")
        if m.group("py") != "311":
            problems.append(f"base image Python py{m.group('py')}, want py311")
        return problems, m.group("cu")
    if (m := re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*devel\S*", base)):
        return [], m.group(1) + m.group(2)
    return [f"base image {base!r} is neither rayproject/ray:<ray>-py311-cuXYZ nor an nvidia/cuda devel image"], None


def torch_build_problems(all_runs: str, requirements: str, pins: dict[str, str], base_cuda: str | None) -> list[str]:
    """One PyTorch CUDA wheel index, matching the base's CUDA; the torch the image checks is the pinned one."""
    problems = []
    indexes = set(re.findall(r"download\.pytorch\.org/whl/cu(\d+)", all_runs))
    if len(indexes) != 1:
        problems.append(f"want exactly one PyTorch CUDA wheel index, got {sorted(indexes)}")
    elif base_cuda and indexes != {base_cuda}:
        problems.append(f"torch wheel index cu{indexes.pop()} does not match the base image's CUDA cu{base_cuda}")
    stated = set(re.findall(r"download\.pytorch\.org/whl/cu(\d+)", requirements))
    if stated and base_cuda and stated != {base_cuda}:
        problems.append(f"requirements.txt names index cu{sorted(stated)}, the image is cu{base_cuda}")
    if "torch" not in pins:
        return problems + ["requirements.txt must pin torch==<version>"]
    for version in set(re.findall(r"'(\d+\.\d+\.\d+)'", all_runs)) - {pins.get("ray")}:
        if version != pins["torch"]:
            problems.append(f"the Dockerfile checks torch {version}, requirements.txt pins {pins['torch']}")
    for cuda in re.findall(r"torch\.version\.cuda\s*==\s*'(\d+)\.(\d+)'", all_runs):
        if base_cuda and "".join(cuda) != base_cuda:
            problems.append(f"the Dockerfile expects torch CUDA {'.'.join(cuda)}, the base is cu{base_cuda}")
    return problems


def _pip_install_problems(pip_args: list[str], tokens: list[str], copied: bool) -> tuple[list[str], int]:
    """Problems of one pip install and how many times it installs requirements.txt."""
    problems, positional, installs, k = [], [], 0, 0
    while k < len(pip_args):
        tok = pip_args[k]
        if tok in ("-r", "--requirement"):
            if pip_args[k + 1] != "requirements.txt":
                problems.append(f"installs another requirements file: {pip_args[k + 1]}")
            elif not copied:
                problems.append("pip install -r requirements.txt before COPY requirements.txt")
            installs += 1
            k += 2
        elif tok in ("-c", "--constraint"):
            problems.append(f"a second pin list: {tok} {pip_args[k + 1]}")
            k += 2
        else:
            if not tok.startswith("-"):
                positional.append(tok)
            k += 2 if tok in PIP_VALUE_OPTIONS else 1
    for spec in positional:
        if not (spec == "." or spec.startswith(("./", "/"))):
            problems.append(f"installs a package of its own: {spec!r} ({' '.join(tokens)})")
        elif "--no-deps" not in pip_args:
            problems.append(f"the project install must be --no-deps (its deps are requirements.txt): {' '.join(tokens)}")
    return problems, installs


def install_problems(instructions: Instructions) -> list[str]:
    """Exactly requirements.txt: copied first, installed once with -r, no package list of the image's own."""
    copied_at = next((n for n, (i, a) in enumerate(instructions)
                      if i in ("COPY", "ADD") and "requirements.txt" in a.split()[:-1]), None)
    problems, req_installs = [], 0
    for n, (instr, args) in enumerate(instructions):
        if instr != "RUN":
            continue
        for tokens in _shell_commands(args):
            if tokens[0] in ("conda", "mamba", "micromamba") and "install" in tokens:
                problems.append(f"a package list of its own: {' '.join(tokens)}")
            pip_args = _pip_install_args(tokens)
            if pip_args is not None:
                found, installs = _pip_install_problems(pip_args, tokens, copied_at is not None and copied_at < n)
                problems += found
                req_installs += installs
    if req_installs != 1:
        problems.append(f"want exactly one `pip install -r requirements.txt`, got {req_installs}")
    return problems


def dockerignore_problems(instructions: Instructions, dockerignore: str) -> list[str]:
    """.dockerignore must not hide what the Dockerfile copies, and must keep .git out."""
    patterns = [p.strip().lstrip("/") for p in dockerignore.splitlines() if p.strip() and not p.startswith("#")]
    problems = []
    for instr, args in instructions:
        if instr not in ("COPY", "ADD") or "--from=" in args:
            continue
        for src in [t for t in args.split() if not t.startswith("--")][:-1]:
            src = src.removeprefix("./").lstrip("/") or "."
            for pat in patterns:
                if not pat.startswith("!") and (fnmatch(src, pat) or src.startswith(pat.rstrip("/") + "/")
                                                or (pat.startswith("**/") and fnmatch(Path(src).name, pat[3:]))):
                    problems.append(f".dockerignore pattern {pat!r} hides {src!r}, which the Dockerfile copies")
    if ".git" not in patterns:
        problems.append(".dockerignore should keep .git out of the build context")
    return problems


def dockerfile_problems(text: str, requirements: str, dockerignore: str) -> list[str]:
    instructions = dockerfile_instructions(text)
    pins = requirement_pins(requirements)
    problems, base_cuda = base_image_problems(instructions, pins)
    all_runs = " ".join(a for i, a in instructions if i == "RUN")
    problems += torch_build_problems(all_runs, requirements, pins, base_cuda)
    problems += install_problems(instructions)
    # DeepSpeed ops buildable on GPU nodes: CUDA devel base (nvcc) + ninja, or pre-built via DS_BUILD_*.
    if "ninja" not in all_runs and "DS_BUILD_" not in text:
        problems.append("DeepSpeed ops: install ninja (JIT builds) or pre-build with DS_BUILD_* flags")
    users = [a for i, a in instructions if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"the image must end as a non-root USER, got {users[-1] if users else 'none'}")
    return problems + dockerignore_problems(instructions, dockerignore)
