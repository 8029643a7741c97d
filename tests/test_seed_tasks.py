import http.server
import json
import threading
from functools import partial

import pytest

from refine_af_utils.seeds import SeedTaskError, load_seed_tasks, write_seed_tasks
from refine_af_utils.stages.seed_tasks import seed_summary

GOOD = {"id": "t1", "name": "n", "instruction": "Say hi to the user politely.",
        "instances": [{"input": "", "output": "Hi!"}], "is_classification": False}


def test_bundled_seed_set():
    tasks = load_seed_tasks("bundled")
    assert 30 <= len(tasks) <= 40
    assert sum(t.is_classification for t in tasks) >= 8
    assert len({t.id for t in tasks}) == len(tasks)
    summary = dict(zip(*seed_summary(tasks).to_dict("list").values()))
    assert summary["tasks"] == len(tasks)
    assert summary["instances with empty input"] > 0


def _write_lines(tmp_path, lines):
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _with(**changes):
    record = dict(GOOD, **changes)
    return json.dumps({k: v for k, v in record.items() if v is not ...})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"id": "t2", "name": ', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        (_with(instruction=...), "missing field 'instruction'"),
        (_with(instruction="   "), "field 'instruction' is empty"),
        (_with(instruction=5), "field 'instruction' must be str"),
        (_with(is_classification="no"), "field 'is_classification' must be bool"),
        (_with(instances="x"), "field 'instances' must be list"),
        (_with(instances=[]), "field 'instances' is an empty list"),
        (_with(instances=[{"input": ""}]), "field 'instances[0]': missing field 'output'"),
        (_with(instances=[{"input": 1, "output": "a"}]), "field 'input' must be str"),
        (_with(id=True), "field 'id' must be str or int"),
        (_with(id="t1"), "field 'id' duplicates id 't1' of line 1"),
    ],
)
def test_malformed_seed_files_name_file_line_and_field(tmp_path, bad_line, message):
    path = _write_lines(tmp_path, [json.dumps(GOOD), bad_line])
    with pytest.raises(SeedTaskError) as error:
        load_seed_tasks(path)
    assert f"{path}:2" in str(error.value)
    assert message in str(error.value)


def test_empty_and_missing_files(tmp_path):
    empty = _write_lines(tmp_path, [])
    with pytest.raises(SeedTaskError, match="no seed tasks"):
        load_seed_tasks(empty)
    with pytest.raises(SeedTaskError, match="not found"):
        load_seed_tasks(tmp_path / "missing.jsonl")


def test_extra_fields_are_kept_and_round_trip(tmp_path):
    path = _write_lines(tmp_path, [_with(source="mine"), "", _with(id=7, name="m")])
    tasks = load_seed_tasks(path)
    assert tasks[0].extra == {"source": "mine"} and tasks[1].id == "7"
    out = tmp_path / "out.jsonl"
    write_seed_tasks(tasks, out)
    assert [t.to_dict() for t in load_seed_tasks(out)] == [t.to_dict() for t in tasks]


def test_url_source_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_AF_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "www"
    served.mkdir()
    (served / "seed_tasks.jsonl").write_text(json.dumps(GOOD) + "\n")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/seed_tasks.jsonl"
    try:
        assert [t.id for t in load_seed_tasks(url)] == ["t1"]
    finally:
        server.shutdown()
        server.server_close()
    assert [t.id for t in load_seed_tasks(url)] == ["t1"]  # server gone: read from the cache
    with pytest.raises(SeedTaskError, match="could not download"):
        load_seed_tasks(url.replace("seed_tasks", "other"))
