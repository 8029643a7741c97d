"""The paper recipes' real data, one command: Super-NI's test tasks and Self-Instruct's files at pinned commits.

    python -m refine_af_utils.downloads superni --commit <sha> [--max-instances 100]
    python -m refine_af_utils.downloads self-instruct [--commit <sha>]

``superni`` downloads ``splits/default/test_tasks.txt`` of allenai/natural-instructions at the commit and
only the task files it lists (not the whole repository), keeps the first ``max_instances`` instances of each
and checks every file with :func:`refine_af_utils.superni.load_task` as it arrives. ``self-instruct``
downloads yizhongw/self-instruct's ``data/seed_tasks.jsonl`` (checked with the seed loader) and
``human_eval/user_oriented_instructions.jsonl``. Files go to ``<cache>/<source>/<commit>/``
(:func:`refine_af_utils.run_folder.cache_dir`) with a ``manifest.json``: commit, and per file its sha256, its
instance count and, for Super-NI tasks, the ``Instance License``.

Every file is written to a partial name and renamed once complete and checked, and the manifest is rewritten
after every file, so a download cut off at any moment leaves nothing that looks complete; a rerun continues
with the files the manifest does not list. A finished download is verified against its manifest on every
later run (a missing or changed file is fetched again and must match). ``evaluation.superni_dir:
superni@<commit>`` in params points stage 6 at the downloaded tasks.

The server is ``https://raw.githubusercontent.com`` unless ``--base-url`` or ``$REFINE_AF_DATA_URL`` says
otherwise (the tests serve fixture files from 127.0.0.1).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from refine_af_utils.errors import RefineAFError
from refine_af_utils.files import atomic_write_text, cache_dir, copy_capped, sha256_file

BASE_URL_ENV = "REFINE_AF_DATA_URL"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
SUPERNI_REPO = "allenai/natural-instructions"
SUPERNI_SPLIT = "splits/default/test_tasks.txt"
SUPERNI_REF = "superni@"  # evaluation.superni_dir: superni@<commit>
SELF_INSTRUCT_REPO = "yizhongw/self-instruct"
SELF_INSTRUCT_COMMIT = "0b26ccaa415992100fa32df62d41b994cf928e23"
SELF_INSTRUCT_SEEDS = "data/seed_tasks.jsonl"
SELF_INSTRUCT_USER_ORIENTED = "human_eval/user_oriented_instructions.jsonl"
MANIFEST = "manifest.json"
PARTIAL = ".partial"  # folder for downloads in progress, inside the commit's folder
TIMEOUT_S = 60


class DataError(RefineAFError, RuntimeError):
    """A download that failed or a cached file that does not match its manifest (one line, naming the URL or file)."""


def base_url(override: Optional[str] = None) -> str:
    """The server: ``override``, ``$REFINE_AF_DATA_URL`` or raw.githubusercontent.com, without a trailing slash."""
    return (override or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def _check_commit(commit: str) -> str:
    commit = commit.strip().lower()
    if len(commit) < 7 or any(ch not in "0123456789abcdef" for ch in commit):
        raise DataError(f"commit '{commit}': expected a git commit sha (hex, at least 7 characters)")
    return commit


def superni_folder(commit: str) -> Path:
    """Where :func:`fetch_superni` puts a commit's files: ``<cache>/superni/<commit>``."""
    return cache_dir() / "superni" / _check_commit(commit)


def self_instruct_folder(commit: str = SELF_INSTRUCT_COMMIT) -> Path:
    """Where :func:`fetch_self_instruct` puts a commit's files: ``<cache>/self-instruct/<commit>``."""
    return cache_dir() / "self-instruct" / _check_commit(commit)


def download(url: str, target: Path, timeout: float = TIMEOUT_S) -> Path:
    """GET ``url`` into ``target`` (its parent is created); the whole body or a :class:`DataError` naming the URL.

    The body is checked against ``Content-Length`` when the server sends one, so a connection cut
    mid-file is an error, never a short file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            expected = response.headers.get("Content-Length")
            size = copy_capped(response, out, url)
        if expected is not None and size != int(expected):
            raise DataError(f"{url}: download cut off ({size} of {expected} bytes); run the command again")
    except urllib.error.HTTPError as error:
        raise DataError(f"{url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DataError(f"{url}: cannot download ({error.reason})") from None
    except (OSError, http.client.HTTPException) as error:  # timeouts, resets, IncompleteRead
        raise DataError(f"{url}: download failed ({type(error).__name__}: {error}); run the command again") from None
    return target


class _Manifest:
    """``manifest.json`` of one source and commit, rewritten atomically after every file."""

    def __init__(self, folder: Path, header: dict[str, Any]):
        self.folder = folder
        self.path = folder / MANIFEST
        self.header = header
        self.files: dict[str, dict[str, Any]] = {}
        self.complete = False
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise DataError(f"{self.path}: unreadable manifest ({error}); delete {folder} and run again") from None
            mismatch = {k: (data.get(k), v) for k, v in header.items() if data.get(k) != v}
            if mismatch:
                key, (was, now) = next(iter(mismatch.items()))
                raise DataError(f"{self.path}: made with {key}={was!r}, not {now!r}; delete {folder} to download again")
            self.files = {entry["file"]: entry for entry in data.get("files", [])}
            self.complete = bool(data.get("complete"))

    def save(self) -> None:
        data = {**self.header, "complete": self.complete, "files": list(self.files.values())}
        atomic_write_text(self.path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def verified(self, name: str) -> bool:
        """True when ``name`` is listed and the file on disk has the recorded sha256."""
        entry = self.files.get(name)
        path = self.folder / name
        return entry is not None and path.is_file() and sha256_file(path) == entry["sha256"]


def _fetch_files(
    folder: Path, header: dict[str, Any], names: Callable[[], Iterable[str]], url_of: Callable[[str], str],
    store: Callable[[str, Path, Path], dict[str, Any]], log: Callable[[str], None],
) -> dict[str, Any]:
    """Download ``names()`` one by one: each into ``.partial/``, stored and checked by ``store``, then renamed.

    ``store(name, downloaded, out)`` writes the file to keep at ``out`` (checked) and returns its manifest
    fields. A file the manifest lists with the same sha256 is kept; after a complete download a changed
    or missing file is fetched again and must match the manifest.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _Manifest(folder, header)
    was_complete = manifest.complete
    partial_dir = folder / PARTIAL
    shutil.rmtree(partial_dir, ignore_errors=True)  # leftovers of a cut run: never trusted
    fetched = 0
    for name in names():
        if manifest.verified(name):
            continue
        url = url_of(name)
        log(f"{url}")
        downloaded = download(url, partial_dir / "download" / Path(name).name)
        out = partial_dir / name
        out.parent.mkdir(parents=True, exist_ok=True)
        entry = {"file": name, **store(name, downloaded, out), "sha256": sha256_file(out)}
        before = manifest.files.get(name)
        if was_complete and before is not None and before["sha256"] != entry["sha256"]:
            raise DataError(f"{folder / name}: downloaded again from {url}, sha256 {entry['sha256']} differs from "
                            f"the manifest's {before['sha256']}; delete {folder} to start over")
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        out.replace(folder / name)
        downloaded.unlink(missing_ok=True)
        manifest.files[name] = entry
        manifest.save()
        fetched += 1
    manifest.complete = True
    manifest.save()
    shutil.rmtree(partial_dir, ignore_errors=True)
    return {"folder": folder, "files": len(manifest.files), "downloaded": fetched,
            "verified": len(manifest.files) - fetched}


def _store_copy(check: Callable[[Path], int]) -> Callable[[str, Path, Path], dict[str, Any]]:
    def store(name: str, downloaded: Path, out: Path) -> dict[str, Any]:
        shutil.copyfile(downloaded, out)
        return {"instances": check(out)}
    return store


def _read_split(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_split(path: Path) -> int:
    names = _read_split(path)
    bad = [n for n in names if "/" in n or n.startswith(".")]
    if not names or bad:
        raise DataError(f"{path}: not a task list ({'empty' if not names else 'bad name ' + repr(bad[0])})")
    return len(names)


def _store_task(url_of: Callable[[str], str], max_instances: int) -> Callable[[str, Path, Path], dict[str, Any]]:
    def store(name: str, downloaded: Path, out: Path) -> dict[str, Any]:
        from refine_af_utils.superni import SuperNIError, load_task

        try:
            data = json.loads(downloaded.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{url_of(name)}: not a JSON task file ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
            raise DataError(f"{url_of(name)}: not a Super-NI task file (no 'Instances' list)")
        available = len(data["Instances"])
        data["Instances"] = data["Instances"][:max_instances]
        out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fewer than max_instances: recorded in the manifest instead
                task = load_task(out, max_instances)
        except SuperNIError as error:
            raise DataError(f"{url_of(name)}: {str(error).replace(str(out), Path(name).name)}") from None
        return {"instances": len(task.instances), "available_instances": available,
                "instance_license": data.get("Instance License")}
    return store


def fetch_superni(commit: str, max_instances: int = 100, url: Optional[str] = None,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Download (or verify) Super-NI's test split and its task files at ``commit`` into :func:`superni_folder`."""
    commit = _check_commit(commit)
    if max_instances < 1:
        raise DataError(f"max_instances {max_instances}: must be at least 1")
    folder = superni_folder(commit)
    root = f"{base_url(url)}/{SUPERNI_REPO}/{commit}"

    def url_of(name: str) -> str:
        return f"{root}/{name}"

    def names() -> Iterator[str]:  # lazily: the task list is read once the split is in place
        yield SUPERNI_SPLIT
        for name in _read_split(folder / SUPERNI_SPLIT):
            yield f"tasks/{name}.json"

    header = {"source": SUPERNI_REPO, "commit": commit, "max_instances": max_instances}
    split_store = _store_copy(_check_split)
    task_store = _store_task(url_of, max_instances)

    def store(name: str, downloaded: Path, out: Path) -> dict[str, Any]:
        return split_store(name, downloaded, out) if name == SUPERNI_SPLIT else task_store(name, downloaded, out)

    return _fetch_files(folder, header, names, url_of, store, log)


def _check_user_oriented(path: Path) -> int:
    count = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path.name}:{number}: not JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                or not isinstance(record.get("instances"), list):
            raise DataError(f"{path.name}:{number}: expected an object with 'instruction' and 'instances'")
        count += 1
    if not count:
        raise DataError(f"{path.name}: no instructions")
    return count


def _check_seeds(path: Path) -> int:
    from refine_af_utils.seeds import SeedTaskError, load_seed_tasks

    try:
        return len(load_seed_tasks(path))
    except SeedTaskError as error:
        raise DataError(str(error)) from None


def fetch_self_instruct(commit: str = SELF_INSTRUCT_COMMIT, url: Optional[str] = None,
                        log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Download (or verify) Self-Instruct's seed tasks and user-oriented instructions at ``commit``."""
    commit = _check_commit(commit)
    root = f"{base_url(url)}/{SELF_INSTRUCT_REPO}/{commit}"
    checks = {SELF_INSTRUCT_SEEDS: _check_seeds, SELF_INSTRUCT_USER_ORIENTED: _check_user_oriented}

    def store(name: str, downloaded: Path, out: Path) -> dict[str, Any]:
        return _store_copy(checks[name])(name, downloaded, out)

    return _fetch_files(self_instruct_folder(commit), {"source": SELF_INSTRUCT_REPO, "commit": commit},
                        lambda: list(checks), lambda name: f"{root}/{name}", store, log)


def resolve_superni_ref(value: str) -> Path:
    """``superni@<commit>`` -> the downloaded, manifest-verified folder (a :class:`SuperNIError` otherwise)."""
    from refine_af_utils.superni import SuperNIError

    commit = value[len(SUPERNI_REF):]
    command = f"python -m refine_af_utils.downloads superni --commit {commit}"
    try:
        folder = superni_folder(commit)
    except DataError as error:
        raise SuperNIError(f"evaluation.superni_dir: '{value}': {error}") from None
    manifest = folder / MANIFEST
    if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
        raise SuperNIError(f"evaluation.superni_dir: '{value}' is not downloaded (no complete {manifest}); "
                           f"run `{command}`")
    for entry in json.loads(manifest.read_text())["files"]:
        path = folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise SuperNIError(f"{path}: missing or changed since the download (manifest {manifest}); "
                               f"run `{command}` to fetch it again")
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: ``superni --commit SHA`` or ``self-instruct [--commit SHA]``."""
    parser = argparse.ArgumentParser(prog="python -m refine_af_utils.downloads", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    superni = sub.add_parser("superni", help=f"{SUPERNI_REPO}: the default test split's task files")
    superni.add_argument("--commit", required=True, help="natural-instructions commit sha to pin")
    superni.add_argument("--max-instances", type=int, default=100, help="instances kept per task (default 100)")
    self_instruct = sub.add_parser("self-instruct", help=f"{SELF_INSTRUCT_REPO}: seed tasks, user-oriented set")
    self_instruct.add_argument("--commit", default=SELF_INSTRUCT_COMMIT, help="self-instruct commit sha")
    for command in (superni, self_instruct):
        command.add_argument("--base-url", default=None,
                             help=f"server to download from (default ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
        command.add_argument("--quiet", action="store_true", help="do not print each URL")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        if not args.quiet:
            print(f"  {line}", flush=True)

    try:
        if args.source == "superni":
            result = fetch_superni(args.commit, args.max_instances, args.base_url, log)
        else:
            result = fetch_self_instruct(args.commit, args.base_url, log)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{result['folder']}: {result['files']} files ({result['downloaded']} downloaded, "
          f"{result['verified']} verified against {MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
