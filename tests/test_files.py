"""Result files: concurrent JSONL appends keep every record once, torn and malformed lines, modes,
symlinks and pipes."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from fprobe import files
from helpers import SUBPROCESS_ENV


def run_python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )


APPENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fprobe import files
    path, writer, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    (path.parent / f"ready-{writer}").touch()
    while len(list(path.parent.glob("ready-*"))) < 2:
        time.sleep(0.01)
    for i in range(n):
        files.append_json_line(path, {"key": {"writer": writer, "i": i}}, unique="key")
""")


def test_two_processes_appending_keep_every_record_exactly_once(tmp_path):
    out = tmp_path / "r.jsonl"
    writers = [run_python(APPENDER, str(out), w, "200") for w in ("a", "b")]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    keys = [(r["key"]["writer"], r["key"]["i"]) for r in map(json.loads, out.read_text().splitlines())]
    assert sorted(keys) == sorted((w, i) for w in ("a", "b") for i in range(200))


def test_append_skips_a_key_already_written(tmp_path):
    out = tmp_path / "r.jsonl"
    assert files.append_json_line(out, {"key": {"model": "m", "lora": (2, 4.0)}, "v": 1}, unique="key")
    assert not files.append_json_line(out, {"key": {"lora": [2, 4.0], "model": "m"}, "v": 2}, unique="key")
    assert [json.loads(line)["v"] for line in out.read_text().splitlines()] == [1]


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_new_result_files_follow_the_umask(tmp_path, umask_027):
    files.write_atomic(tmp_path / "r.json", "{}\n")
    files.append_json_line(tmp_path / "r.jsonl", {"key": 1}, unique="key")
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "r.jsonl").stat().st_mode) == 0o640


def test_rewritten_result_file_keeps_its_mode(tmp_path, umask_027):
    out = tmp_path / "r.json"
    out.write_text("old\n")
    out.chmod(0o604)
    files.write_atomic(out, "new\n")
    assert stat.S_IMODE(out.stat().st_mode) == 0o604 and out.read_text() == "new\n"


def test_a_symlinked_output_is_written_through_to_its_target(tmp_path):
    target, link = tmp_path / "store" / "r.json", tmp_path / "r.json"
    target.parent.mkdir()
    target.write_text("old\n")
    link.symlink_to(target)
    files.write_atomic(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    jsonl_target, jsonl_link = tmp_path / "store" / "r.jsonl", tmp_path / "r.jsonl"
    jsonl_link.symlink_to(jsonl_target)
    files.append_json_line(jsonl_link, {"key": 1}, unique="key")
    assert jsonl_link.is_symlink() and jsonl_target.read_text() == '{"key": 1}\n'


def test_a_pipe_output_is_written_to_not_replaced(tmp_path):
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    files.check_writable(fifo, "--out")
    files.write_atomic(fifo, '{"a": 1}\n')
    reader.join(timeout=10)
    assert received == ['{"a": 1}\n'] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_record_torn_by_a_killed_writer_is_cut_off_and_the_run_resumes(tmp_path):
    out = tmp_path / "r.jsonl"
    whole = json.dumps({"key": {"model": "a"}}) + "\n"
    out.write_text(whole + '{"key": {"model": "b"}, "result": {"delta')  # killed mid-line
    assert [r["key"] for _, r in files.read_jsonl_locked(out, "results file")] == [{"model": "a"}]
    assert files.append_json_line(out, {"key": {"model": "b"}}, unique="key")
    assert out.read_text() == whole + json.dumps({"key": {"model": "b"}}) + "\n"


KILLED_MID_WRITE = textwrap.dedent("""
    import fcntl, os, sys, time
    file = open(sys.argv[1], "ab")
    fcntl.flock(file.fileno(), fcntl.LOCK_EX)
    os.write(file.fileno(), b'{"key": {"model": "b"}, "res')
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_writer_killed_mid_line_holding_the_lock_blocks_nothing(tmp_path):
    import fcntl

    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"key": {"model": "a"}}) + "\n")
    writer = run_python(KILLED_MID_WRITE, str(out))
    assert writer.stdout.readline() == "locked\n"
    writer.kill()
    writer.communicate()
    with out.open("ab") as probe:
        fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the dead writer's lock remained
    assert files.append_json_line(out, {"key": {"model": "b"}}, unique="key")
    assert [r["key"]["model"] for r in map(json.loads, out.read_text().splitlines())] == ["a", "b"]


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"key": 1}')  # written by hand or by another tool
    assert files.append_json_line(out, {"key": 2}, unique="key")
    assert out.read_text() == '{"key": 1}\n{"key": 2}\n'


def test_a_malformed_earlier_line_is_still_an_error_and_the_file_is_untouched(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"key": 1}\n{truncated\n{"key": 3}\n')
    with pytest.raises(ValueError, match="r.jsonl:2: malformed JSON"):
        files.append_json_line(out, {"key": 4}, unique="key")
    assert out.read_text() == '{"key": 1}\n{truncated\n{"key": 3}\n'


def test_an_output_in_folders_still_to_be_made_is_writable(tmp_path):
    files.check_writable(tmp_path / "new" / "deeper" / "r.json", "--out")
    files.append_json_line(tmp_path / "new" / "deeper" / "r.jsonl", {"key": 1}, unique="key")
    assert (tmp_path / "new" / "deeper" / "r.jsonl").read_text() == '{"key": 1}\n'
