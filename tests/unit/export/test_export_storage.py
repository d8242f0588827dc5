"""Export on shared storage (issue 20, item 8): the temp folder of a live export is never
removed by another export, whatever host or container it runs on (a lock and an age decide,
not a process id); a kill -9 of an export takes its parity child with it and leaves nothing
outside its temp folder; a race at the final rename is one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jewelclf.cli import main
from jewelclf.errors import JewelclfError
from jewelclf.export import layout, staging
from jewelclf.export import savedmodel as ex

from export_helpers import exported_tiny

QUIET = {"log": lambda _: None}
LATER = 3600.0  # seconds: every heartbeat is stale by then

HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    folder = sys.argv[1]
    os.makedirs(folder)
    fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("LOCKED", flush=True)
    sys.stdin.read()  # hold the lock until told
""")


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_a_live_export_of_another_host_is_kept_though_its_pid_means_nothing_here(tmp_path):
    """Another container's export: its folder names a pid that is no process here, and its
    heartbeat stalled an hour ago, but it holds its lock: it is kept. (Removed before.)"""
    other = tmp_path / f"{staging.TMP_PREFIX}999999-0a1b"  # the old naming: pid 999999 is not alive here
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(other)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        (other / "saved_model.pb").write_bytes(b"half written")
        for p in (other / "lock", other):
            _age(p, 2 * LATER)
        assert ex.cleanup_stale_temp(tmp_path, **QUIET) == []
        assert ex.cleanup_stale_temp(tmp_path, now=time.time() + LATER, **QUIET) == []
        assert (other / "saved_model.pb").is_file()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The export is gone (its lock released): once its heartbeat is stale too, it is removed.
    assert ex.cleanup_stale_temp(tmp_path, **QUIET) == [other.name]
    assert not other.exists()


def test_an_unlocked_folder_is_removed_only_once_its_heartbeat_is_stale(tmp_path):
    from jewelclf.export import staging

    live = staging.Staging(tmp_path)
    try:
        legacy = tmp_path / f"{staging.TMP_PREFIX}{os.getpid()}-cd"  # an older jewelclf's: no lock inside
        legacy.mkdir()
        crashed = tmp_path / f"{staging.TMP_PREFIX}0c0ffee"
        crashed.mkdir()
        (crashed / staging.LOCK).touch()
        assert ex.cleanup_stale_temp(tmp_path, **QUIET) == []  # all fresh
        now = live.now()  # the storage's clock, not this host's
        _age(crashed / staging.LOCK, staging.STALE_SECONDS + 5)
        assert ex.cleanup_stale_temp(tmp_path, now=now, keep=live.path, **QUIET) == [crashed.name]
        removed = ex.cleanup_stale_temp(tmp_path, now=now + LATER, keep=live.path, **QUIET)
        assert removed == [legacy.name] and live.path.is_dir()
        # Even unnamed as the caller's own, a live folder is kept: its lock is held.
        assert ex.cleanup_stale_temp(tmp_path, now=now + LATER, **QUIET) == []
    finally:
        live.close()
    assert list(tmp_path.iterdir()) == []


def test_the_heartbeat_keeps_a_live_folder_fresh(tmp_path, monkeypatch):
    from jewelclf.export import staging

    monkeypatch.setattr(staging, "HEARTBEAT_SECONDS", 0.05)
    live = staging.Staging(tmp_path)
    try:
        _age(live.path / staging.LOCK, LATER)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and time.time() - (live.path / staging.LOCK).stat().st_mtime > 60:
            time.sleep(0.05)
        assert time.time() - (live.path / staging.LOCK).stat().st_mtime < 60
    finally:
        live.close()


def test_rename_onto_an_existing_version_is_one_line_and_replaces_nothing(tmp_path):
    from jewelclf.export import staging

    src = tmp_path / "src"
    src.mkdir()
    (src / "saved_model.pb").write_text("ours")
    for dst, content in ((tmp_path / "1", "theirs"), (tmp_path / "2", None)):
        dst.mkdir()
        if content:
            (dst / "saved_model.pb").write_text(content)
        with pytest.raises(JewelclfError, match="appeared while exporting") as e:
            staging.rename_noreplace(src, dst)
        assert "\n" not in str(e.value)
        assert (src / "saved_model.pb").read_text() == "ours"
        assert [p.name for p in dst.iterdir()] == (["saved_model.pb"] if content else [])  # an empty one too
    staging.rename_noreplace(src, tmp_path / "3")
    assert (tmp_path / "3" / "saved_model.pb").read_text() == "ours" and not src.exists()


def test_a_version_that_appears_at_the_final_rename_is_a_one_line_error(tiny_run, tmp_path_factory,
                                                                       tmp_path, monkeypatch):
    """Another export publishes version 1 after this one checked that 1 was free: exit 2 and
    one line, their version untouched, no temp folder left (a traceback before)."""
    exported = exported_tiny(tiny_run, tmp_path_factory)
    base = tmp_path / "tiny"
    final = base / "1"

    def write(run, path, policy):
        shutil.copytree(exported / "1", path)
        final.mkdir()  # theirs lands while ours is checked
        (final / "saved_model.pb").write_text("theirs")

    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p, **kw: False if p == final else real_exists(p, **kw))
    monkeypatch.setattr(ex, "write_savedmodel", write)
    monkeypatch.setattr(ex, "run_in_fresh_process", lambda *a, **k: {"signatures": {}})
    monkeypatch.setattr(ex, "compare_parity", lambda *a, **k: {"passed": True, "problems": []})
    monkeypatch.setattr(ex, "check_signature_contract", lambda *a, **k: [])
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--output", str(base)])
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit)
    lines = [ln for ln in r.output.splitlines() if "appeared while exporting" in ln]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert (final / "saved_model.pb").read_text() == "theirs"
    assert not [p for p in base.iterdir() if p.name.startswith(staging.TMP_PREFIX)]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie no reaper collected is dead too


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_kill_9_of_an_export_takes_its_parity_child_and_leaves_nothing_outside(tiny_run, tmp_path):
    """kill -9 of the export alone (not its process group) while its parity child runs: the
    child dies with it, no jewelclf-parity-* folder is left in TMPDIR, and the next export's cleanup finds the one
    folder left. (Before, the child ran on and a jewelclf-parity-* folder stayed in /tmp.)"""
    base = tmp_path / "tiny"
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "jewelclf", "export", str(tiny_run), "--output", str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None and not children:
            children = [c for c in _children(proc.pid) if b"parity_child.py" in Path(f"/proc/{c}/cmdline").read_bytes()]
            time.sleep(0.05)
        assert children, "the export never started its parity check"
        time.sleep(1.0)  # the child is past its start
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(map(_alive, children)):
            time.sleep(0.1)
        assert not any(map(_alive, children)), "the parity child outlived the export"
    finally:
        for c in children:
            if _alive(c):
                os.kill(c, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # (TensorFlow's own AutoGraph files may be there: they are not the export's.)
    assert not [p.name for p in scratch.iterdir() if not p.name.startswith("__autograph_generated_file")]
    assert layout.list_versions(base) == []
    left = [p.name for p in base.iterdir()]
    assert len(left) == 1 and left[0].startswith(staging.TMP_PREFIX), left
    assert ex.cleanup_stale_temp(base, now=time.time() + LATER, **QUIET) == left
    assert list(base.iterdir()) == []
