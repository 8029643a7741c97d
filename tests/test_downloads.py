"""``python -m refine_af_utils.downloads``: downloads from a real HTTP server on 127.0.0.1 serving fixture files.

The fixture tree mirrors raw.githubusercontent.com: ``<owner>/<repo>/<commit>/<path>``. The server can cut
a response mid-body (full Content-Length, half the bytes) or stall in the middle of one, so a cut
connection and a killed process are the real thing. Nothing goes outside the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from refine_af_utils.downloads import (
    MANIFEST,
    SELF_INSTRUCT_COMMIT,
    SUPERNI_SPLIT,
    DataError,
    fetch_self_instruct,
    fetch_superni,
    main,
    resolve_superni_ref,
    superni_folder,
)
from refine_af_utils.stages.superni_evaluation import resolve_superni_dir
from refine_af_utils.seeds import BUNDLED_SEED_TASKS
from refine_af_utils.superni import BUNDLED_SUPERNI, SuperNIError, load_tasks

from conftest import REPO_ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"
pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 100:UserWarning")  # the bundled tasks have 12
BIG = "task900_many_instances"  # 150 instances upstream: 100 are kept


class FixtureServer:
    """A threaded http.server on 127.0.0.1 with a record of requests and switches to cut or stall a file."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.cut: set[str] = set()  # paths answered with half their body, once each
        self.stall: set[str] = set()  # paths whose body stops half-way until `release` is set
        self.stalled = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path in server.cut or self.path in server.stall:
                    body = (server.root / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if self.path in server.stall:
                        server.stalled.set()
                        server.release.wait(30)
                    server.cut.discard(self.path)
                    self.close_connection = True
                    return
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _superni_tree(root: Path) -> list[str]:
    """natural-instructions at COMMIT: the 12 bundled tasks, one with 150 instances, and a split listing them."""
    base = root / "allenai" / "natural-instructions" / COMMIT
    (base / "tasks").mkdir(parents=True)
    names = []
    for path in sorted((BUNDLED_SUPERNI / "tasks").glob("*.json")):
        shutil.copy(path, base / "tasks" / path.name)
        names.append(path.stem)
    task = json.loads((BUNDLED_SUPERNI / "tasks" / f"{names[0]}.json").read_text())
    task["Instances"] = [{"id": f"{BIG}-{i}", "input": f"input {i}", "output": [f"answer {i}"]} for i in range(150)]
    task["Instance License"] = ["CC BY 4.0"]
    (base / "tasks" / f"{BIG}.json").write_text(json.dumps(task))
    names.insert(1, BIG)
    (base / "splits" / "default").mkdir(parents=True)
    (base / SUPERNI_SPLIT).write_text("\n".join(names) + "\n")
    return names


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Fixture files on a local server; the project cache in tmp_path."""
    monkeypatch.setenv("REFINE_AF_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "www"
    names = _superni_tree(root)
    si = root / "yizhongw" / "self-instruct" / SELF_INSTRUCT_COMMIT
    (si / "data").mkdir(parents=True)
    shutil.copy(BUNDLED_SEED_TASKS, si / "data" / "seed_tasks.jsonl")
    (si / "human_eval").mkdir()
    (si / "human_eval" / "user_oriented_instructions.jsonl").write_text("".join(
        json.dumps({"id": f"user_oriented_task_{i}", "motivation_app": "Gmail", "instruction": f"Write reply {i}.",
                    "instances": [{"input": "Hi", "output": "Hello"}]}) + "\n" for i in range(3)))
    running = FixtureServer(root)
    running.names = names
    yield running
    running.close()


def _task_path(name: str) -> str:
    return f"/allenai/natural-instructions/{COMMIT}/tasks/{name}.json"


def test_superni_download_keeps_100_instances_and_writes_a_manifest(server):
    result = fetch_superni(COMMIT, url=server.url)
    folder = superni_folder(COMMIT)
    assert result["folder"] == folder and result["files"] == 14 and result["downloaded"] == 14
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["commit"] == COMMIT and manifest["complete"] and manifest["max_instances"] == 100
    entries = {e["file"]: e for e in manifest["files"]}
    assert set(entries) == {SUPERNI_SPLIT, *(f"tasks/{n}.json" for n in server.names)}
    big = entries[f"tasks/{BIG}.json"]
    assert big["instances"] == 100 and big["available_instances"] == 150 and big["instance_license"] == ["CC BY 4.0"]
    assert len(json.loads((folder / "tasks" / f"{BIG}.json").read_text())["Instances"]) == 100
    assert entries[f"tasks/{server.names[0]}.json"]["instances"] == 12
    assert all(len(e["sha256"]) == 64 for e in entries.values())
    assert not (folder / ".partial").exists()

    tasks = load_tasks(resolve_superni_dir(f"superni@{COMMIT}"))  # what stage 6 does with the params value
    assert [t.name for t in tasks] == server.names
    assert [len(t.instances) for t in tasks][:2] == [12, 100]


def test_a_rerun_verifies_the_manifest_and_downloads_nothing(server):
    fetch_superni(COMMIT, url=server.url)
    server.requests.clear()
    assert main(["superni", "--commit", COMMIT, "--base-url", server.url, "--quiet"]) == 0
    assert server.requests == []

    folder = superni_folder(COMMIT)
    changed = folder / "tasks" / f"{server.names[2]}.json"
    changed.write_text(changed.read_text().replace("Definition", "Definitions", 1))
    with pytest.raises(SuperNIError, match=f"{changed}: missing or changed since the download"):
        resolve_superni_ref(f"superni@{COMMIT}")
    result = fetch_superni(COMMIT, url=server.url)  # fetched again, and it matches the manifest
    assert result["downloaded"] == 1 and server.requests == [_task_path(server.names[2])]
    assert resolve_superni_ref(f"superni@{COMMIT}") == folder

    upstream = server.root / _task_path(server.names[3]).lstrip("/")  # upstream changed; the local copy lost
    (folder / "tasks" / f"{server.names[3]}.json").unlink()
    task = json.loads(upstream.read_text())
    task["Definition"] = ["Something else entirely."]
    upstream.write_text(json.dumps(task))
    with pytest.raises(DataError, match="sha256 .* differs from the manifest"):
        fetch_superni(COMMIT, url=server.url)


def test_a_cut_download_leaves_nothing_complete_and_resumes(server, capsys):
    cut = _task_path(server.names[3])
    server.cut.add(cut)
    assert main(["superni", "--commit", COMMIT, "--base-url", server.url, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {server.url}{cut}: download ") and "run the command again" in err
    assert len(err.splitlines()) == 1
    folder = superni_folder(COMMIT)
    assert not (folder / "tasks" / f"{server.names[3]}.json").exists()
    manifest = json.loads((folder / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["files"]) == 4  # the split and three tasks
    with pytest.raises(SuperNIError, match="is not downloaded .*python -m refine_af_utils.downloads superni --commit"):
        resolve_superni_dir(f"superni@{COMMIT}")

    server.requests.clear()
    assert fetch_superni(COMMIT, url=server.url)["downloaded"] == 10
    assert server.requests[0] == cut  # the finished files were not fetched again
    assert len(load_tasks(resolve_superni_ref(f"superni@{COMMIT}"))) == 13


def test_a_killed_download_resumes(server, tmp_path):
    stalled = _task_path(server.names[5])
    server.stall.add(stalled)
    env = {**os.environ, "REFINE_AF_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "refine_af_utils.downloads", "superni", "--commit", COMMIT, "--base-url", server.url]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.stalled.wait(60), "the download never reached the stalled file"
        os.kill(process.pid, signal.SIGKILL)  # half of the file written, nothing renamed
        process.wait(30)
    finally:
        process.kill()
    server.stall.clear()
    server.release.set()
    folder = superni_folder(COMMIT)
    assert not (folder / "tasks" / f"{server.names[5]}.json").exists()
    assert not json.loads((folder / MANIFEST).read_text())["complete"]
    done = subprocess.run(command + ["--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "8 downloaded, 6 verified" in done.stdout
    assert len(load_tasks(resolve_superni_ref(f"superni@{COMMIT}"))) == 13


def test_network_errors_are_one_line_naming_the_url(server, capsys):
    closed = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    assert main(["superni", "--commit", COMMIT, "--base-url", f"http://127.0.0.1:{port}", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: http://127.0.0.1:{port}/allenai/natural-instructions/{COMMIT}/{SUPERNI_SPLIT}: "
                          "cannot download (") and err.count("\n") == 1

    (server.root / _task_path(server.names[1]).lstrip("/")).unlink()
    assert main(["superni", "--commit", COMMIT, "--base-url", server.url, "--quiet"]) == 1
    assert capsys.readouterr().err == f"error: {server.url}{_task_path(server.names[1])}: HTTP 404 File not found\n"


def test_a_malformed_task_is_named_with_its_url(server):
    path = server.root / _task_path(server.names[2]).lstrip("/")
    task = json.loads(path.read_text())
    del task["Definition"]
    path.write_text(json.dumps(task))
    with pytest.raises(DataError, match=f"^{server.url}{_task_path(server.names[2])}: .*missing field 'Definition'$"):
        fetch_superni(COMMIT, url=server.url)
    assert not (superni_folder(COMMIT) / "tasks" / f"{server.names[2]}.json").exists()


def test_self_instruct_files_at_the_pinned_commit(server, monkeypatch):
    monkeypatch.setenv("REFINE_AF_DATA_URL", server.url)  # the environment variable, not a parameter
    result = fetch_self_instruct()
    manifest = json.loads((result["folder"] / MANIFEST).read_text())
    assert manifest["commit"] == SELF_INSTRUCT_COMMIT and manifest["source"] == "yizhongw/self-instruct"
    counts = {e["file"]: e["instances"] for e in manifest["files"]}
    assert counts == {"data/seed_tasks.jsonl": 36, "human_eval/user_oriented_instructions.jsonl": 3}
    server.requests.clear()
    assert fetch_self_instruct()["verified"] == 2 and server.requests == []


def test_bad_commits_and_missing_downloads_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_AF_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="commit 'main': expected a git commit sha"):
        fetch_superni("main", url="http://127.0.0.1:9")
    with pytest.raises(SuperNIError, match=f"'superni@{COMMIT}' is not downloaded"):
        resolve_superni_dir(f"superni@{COMMIT}")
