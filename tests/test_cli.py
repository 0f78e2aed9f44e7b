"""The `gen2embed` command line, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows.user_errors import BUSY_MACHINE, BusyMachine
from tests.conftest import with_prefect_db

BIN = Path(sys.executable).parent / "gen2embed"


def _cli(*args: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "GEN2EMBED_HOME")}
    return subprocess.run(
        [str(BIN), *args, "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_stages_lists_fingerprints_and_cache_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    res = _cli("stages", "--set", "world.seed=3", workdir=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"workdir {tmp_path}"
    world = next(ln for ln in lines if ln.startswith("world "))
    ingest = next(ln for ln in lines if ln.startswith("ingest "))
    assert "to compute" in world and "to compute" in ingest

    # The same command in this process (an import of the CLI costs ~10 s of CPU a time).
    from flows import cli

    for key, value in {"GEN2EMBED_HOME": tmp_path, "PREFECT_HOME": tmp_path / "prefect"}.items():
        monkeypatch.setenv(key, str(value))  # what configure() sets; restored after
    capsys.readouterr()

    def stages(*args: str) -> list[str]:
        assert cli.main(["stages", *args, "--workdir", str(tmp_path)]) == 0
        return capsys.readouterr().out.splitlines()

    assert stages("--set", "world.seed=3")[2] == lines[2], "in process as on the command line"
    assert stages("--set", "world.seed=4")[2].split()[1] != world.split()[1]
    # `run`'s row selection works here too: only that row's stages are listed.
    labels = [ln.split()[0] for ln in stages("--row", "saha-hierarchical")[2:]]
    assert "evaluate[saha-hierarchical]" in labels
    assert not any(ln.endswith("-plain]") for ln in labels)


def test_bad_override_exits_2_naming_the_key(tmp_path: Path) -> None:
    res = _cli("run", "--set", "ingest.on_bad_row=skip", workdir=tmp_path)
    assert res.returncode == 2
    assert "ingest.on_bad_row: unknown key" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "prefect").exists() or not any((tmp_path / "prefect").iterdir())


def test_bad_data_exits_2_with_the_rows_and_no_traceback(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "VOC2007").mkdir(parents=True)
    (src / "VOC2007" / "original-0.parquet").write_bytes(b"not parquet")
    (tmp_path / "img").mkdir()
    res = _cli(
        "run",
        "--set",
        "ingest.source=mmeb",
        "--set",
        f"ingest.train_dir={src}",
        "--set",
        f"ingest.train_images={tmp_path / 'img'}",
        workdir=with_prefect_db(tmp_path / "w"),
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "is not a readable Parquet file" in res.stderr
    assert "gen2embed: " in res.stderr
    out = res.stdout + res.stderr
    assert out.count("is not a readable Parquet file") == 1, "said once (issue 8.10)"
    assert "Traceback" not in out


def test_a_workdir_that_is_a_file_is_one_clear_message(tmp_path: Path) -> None:
    afile = tmp_path / "data"
    afile.write_text("not a folder")
    res = _cli("stages", workdir=afile)
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == f"gen2embed: workdir {afile} is a file, not a folder; pick another --workdir"
    )


def test_a_prefect_start_up_timeout_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 8.13: the busy-machine failure is one message with the remedy, not a traceback."""
    from flows import cli

    def slow_start(_args: object) -> int:
        raise BusyMachine(BUSY_MACHINE)

    monkeypatch.setenv("GEN2EMBED_HOME", str(tmp_path))  # configure() sets it; restored after
    monkeypatch.setattr(cli, "cmd_stages", slow_start)
    assert cli.main(["stages", "--workdir", str(tmp_path)]) == 3
    assert "gen2embed up" in capsys.readouterr().err


def test_mistakes_found_before_prefect_starts_are_one_message(tmp_path: Path) -> None:
    """Issue 8.10: --from without published inputs and a missing source folder fail before
    any server starts, with one message and no traceback."""
    res = _cli("run", "--from", "ingest", workdir=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip() == (
        "gen2embed: --from ingest needs published results of world, pretrain; "
        "run without --from first"
    )
    assert not (tmp_path / "prefect" / "prefect.db").exists(), "no Prefect store made"
    assert not (tmp_path / "logs" / "prefect-server.log").exists(), "no server started"
    res = _cli(
        "run", "--set", "ingest.source=mmeb", "--set", f"ingest.train_dir={tmp_path / 'nope'}",
        "--set", f"ingest.train_images={tmp_path}", workdir=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == f"gen2embed: dataset folder {tmp_path / 'nope'} does not exist"
    assert not (tmp_path / "logs" / "prefect-server.log").exists(), "no server started"


@contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small or read-only filesystem at `path`; skips where mounting is not allowed."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_workdir_is_one_clear_message(tmp_path: Path) -> None:
    """Issue 8.11: not a 155-second timeout and 883 lines."""
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        res = _cli("stages", workdir=ro)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"gen2embed: workdir {ro} is not writable (Read-only file system)"
    )


def test_a_full_disk_is_one_clear_message(tmp_path: Path) -> None:
    """Issue 8.11: with no room for the workdir's databases the run stops with one line."""
    with _tmpfs(tmp_path / "full", "size=3m") as full:
        res = _cli("run", "--until", "world", workdir=full)
        leftovers = sorted(p.name for p in (full / "prefect").iterdir())
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        f"gen2embed: could not create the Prefect database in {full / 'prefect'}: "
        f"the disk holding {full / 'prefect'} is full"
    )
    assert leftovers == ["prefect.db.lock"], "no half-built database left behind"


def test_a_disk_filling_up_mid_run_ends_with_the_cause_not_database_noise(
    tmp_path: Path,
) -> None:
    """Issue 8.11: room for the databases but not for the world's images. MLflow's and
    Prefect's bookkeeping then fail in turn; the run still ends with the one line to act on,
    not thousands of lines of their tracebacks."""
    with _tmpfs(tmp_path / "full", "size=6m") as full:
        res = _cli("run", "--until", "world", workdir=full)
        partial = list((full / "artifacts" / "world").glob("*.partial"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    cause = next(ln for ln in lines if ln.startswith("gen2embed: "))
    assert cause.startswith("gen2embed: no space left on the device holding ")
    assert "(world); free some and run again" in cause
    assert "Traceback" not in res.stderr
    assert "Error logging to API" not in res.stderr
    assert sum("could not record the run's end" in ln for ln in lines) <= 2  # parent, stage
    assert len(lines) < 20, res.stderr
    assert partial, "the partial folder stays for the rerun"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = _cli("stages", "--set", "ingest.on_bad_row=skip", "--debug", workdir=tmp_path)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ConfigError" in res.stderr
