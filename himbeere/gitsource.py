"""Programs whose code lives in a git repository.

A code document may name a repository instead of holding code::

    {"type": 1234567, "name": "weather",
     "git": {"url": "https://example.org/weather.git", "ref": "v1.2",
             "entry": "weather.station:main"}}

``ref`` is a branch, tag or commit (default ``main``); ``entry`` is
``module:function`` (default ``main:main``).  The node fetches the ref with
the ``git`` command into ``<state_dir>/git/``, extracts that exact commit
into a directory of its own (a running older version keeps its files) and
runs the function with the checkout first on ``sys.path``.  Pushing a new
``ref`` re-deploys the program; the status shows the ``commit`` it runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .exceptions import ProgramError

if TYPE_CHECKING:  # tarfile and hashlib are imported when a git program is fetched
    import tarfile

#: Seconds one git command may take (a slow network, a big repository).
GIT_TIMEOUT = 120.0
#: Checkouts kept per program: the running one and the one before.
KEEP = 2

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclasses.dataclass(frozen=True)
class GitSource:
    url: str
    ref: str
    module: str
    function: str

    def describe(self) -> str:
        return f"{self.url}@{self.ref}"


class GitError(ProgramError):
    """The repository could not be fetched or does not hold the entry point."""

    #: True when trying again later may help (network, server down).
    transient = False


def parse(value: Any) -> GitSource:
    """The ``git`` field of a code document, or a clear :class:`ProgramError`."""
    if not isinstance(value, dict):
        raise ProgramError(
            f"git: is a {type(value).__name__}; allowed: an object with url, ref, entry")
    url, ref = value.get("url"), value.get("ref", "main")
    entry = value.get("entry", "main:main")
    if not isinstance(url, str) or not url.strip():
        raise ProgramError("git.url: missing; allowed: a repository URL git can fetch")
    if not isinstance(ref, str) or not ref.strip() or ref.startswith("-"):
        raise ProgramError(f"git.ref: {ref!r} is not allowed; allowed: a branch, tag or commit")
    if not isinstance(entry, str) or entry.count(":") != 1:
        raise ProgramError(
            f"git.entry: {entry!r} is not allowed; allowed: 'module:function'")
    module, function = entry.split(":")
    if not _MODULE.match(module) or not function.isidentifier():
        raise ProgramError(
            f"git.entry: {entry!r} is not allowed; allowed: 'module:function'")
    return GitSource(url.strip(), ref.strip(), module, function)


def fetch(source: GitSource, root: Path) -> tuple[Path, str]:
    """Fetch ``source`` under ``root``; return the checkout and its commit."""
    repo = root / "repo"
    if not (repo / "HEAD").exists():
        repo.mkdir(parents=True, exist_ok=True)
        _git(["init", "--bare", "--quiet", str(repo)], source)
    _git(["--git-dir", str(repo), "fetch", "--quiet", "--depth", "1", "--no-tags", source.url,
          source.ref], source)
    commit = _git(["--git-dir", str(repo), "rev-parse", "FETCH_HEAD^{commit}"], source).strip()
    checkout = root / commit
    if not checkout.exists():
        import io
        import tarfile

        archive = subprocess.run(
            ["git", "--git-dir", str(repo), "archive", "--format=tar", commit],
            capture_output=True, timeout=GIT_TIMEOUT, env=_env(), check=False)
        if archive.returncode != 0:
            raise GitError(f"git: cannot extract {commit[:12]}: {_last(archive.stderr)}")
        partial = root / (commit + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            _extract(tar, partial)
        os.replace(partial, checkout)
    _check_entry(source, checkout, commit)
    _prune(root, keep=commit)
    return checkout, commit


def checkout_root(state_dir: Path, doc_id: str) -> Path:
    import hashlib

    digest = hashlib.sha1(doc_id.encode()).hexdigest()[:16]
    return state_dir / "git" / digest


def _extract(tar: tarfile.TarFile, target: Path) -> None:
    import tarfile

    if hasattr(tarfile, "data_filter"):
        tar.extractall(target, filter="data")
    else:  # Python < 3.12 without the backported filters
        for member in tar.getmembers():
            if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                raise GitError(f"git: unsafe path in the repository: {member.name}")
        tar.extractall(target)  # noqa: S202 - names checked above


def _check_entry(source: GitSource, checkout: Path, commit: str) -> None:
    relative = Path(*source.module.split("."))
    if not (checkout / relative.with_suffix(".py")).exists() and not (
            checkout / relative / "__init__.py").exists():
        raise GitError(
            f"git.entry: module {source.module!r} is not in {source.describe()} "
            f"(commit {commit[:12]})")


def _prune(root: Path, keep: str) -> None:
    checkouts = sorted((p for p in root.iterdir() if p.is_dir() and p.name != "repo"
                        and p.name != keep), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in checkouts[KEEP - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _env() -> dict[str, str]:
    # Never ask for a password on a terminal nobody watches.
    return dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true")


def _git(args: list[str], source: GitSource) -> str:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT, env=_env(), check=False)
    except FileNotFoundError:
        raise GitError("git: the git command is not installed on this node") from None
    except subprocess.TimeoutExpired:
        error = GitError(f"git: {source.describe()} did not answer in {GIT_TIMEOUT:g} s")
        error.transient = True
        raise error from None
    if result.returncode != 0:
        message = _last(result.stderr)
        if "couldn't find remote ref" in message or "not our ref" in message:
            raise GitError(f"git.ref: {source.ref!r} does not exist in {source.url}")
        error = GitError(f"git: cannot fetch {source.describe()}: {message}")
        error.transient = True
        raise error
    return result.stdout


def _last(stderr: Any) -> str:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else str(stderr)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
