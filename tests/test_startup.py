"""The commands that send nothing start fast (issue 12, item 4): `--help`, `validate`,
`status` and `upload --dry-run` import neither the OCI SDK nor aiohttp nor the rest of what
only sending needs (cryptography to sign, asyncio under aiohttp). Each runs as a user runs
it (tests.conftest.run_cli), with a site hook that writes the modules loaded at exit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import mixed_records, run_cli, write_manifest

HOOK = """\
import atexit, os, sys

def _modules_at_exit():
    with open(os.environ["BATCHLOG_TEST_MODULES"], "w") as f:
        f.write("\\n".join(sorted(sys.modules)))

atexit.register(_modules_at_exit)
"""

# what only sending needs: none of it is loaded by a command that sends nothing
SENDING = ("oci", "aiohttp", "cryptography", "asyncio", "batchlog.transport", "batchlog.auth")


@pytest.fixture
def modules_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the site hook writes: PYTHONPATH names a directory with the hook as
    sitecustomize, which every Python started by run_cli then loads."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", str(site))
    written = tmp_path / "modules.txt"
    monkeypatch.setenv("BATCHLOG_TEST_MODULES", str(written))
    return written


def loaded(modules_of: Path, args: list[str], code: int = 0) -> set[str]:
    """The modules loaded by the end of ``batchlog ARGS`` (which must exit ``code``)."""
    modules_of.unlink(missing_ok=True)
    out = run_cli(args)
    assert out.returncode == code, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return set(modules_of.read_text().split())


def sending(modules: set[str]) -> list[str]:
    return sorted(m for m in SENDING if m in modules)


@pytest.mark.parametrize(
    "args",
    [["--help"], ["upload", "--help"], ["export", "--help"], ["verify", "--help"]],
    ids=lambda args: " ".join(args),
)
def test_help_imports_nothing_that_sends(modules_of: Path, args: list[str]) -> None:
    modules = loaded(modules_of, args)
    assert "argparse" in modules  # the hook saw the command
    assert sending(modules) == [], sending(modules)
    assert "batchlog.job" not in modules and "batchlog.check" not in modules


def test_validate_imports_nothing_that_sends(modules_of: Path, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "runs.jsonl", mixed_records(10))
    modules = loaded(modules_of, ["validate", str(manifest)])
    assert "batchlog.validate" in modules
    assert sending(modules) == [], sending(modules)
    assert "batchlog.job" not in modules


def test_dry_run_imports_nothing_that_sends(modules_of: Path, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "runs.jsonl", mixed_records(10))
    args = ["upload", "--dry-run", str(manifest), "--platform-id", "ocid1.x", "--workspace", "w"]
    modules = loaded(modules_of, args)
    assert "batchlog.check" in modules
    assert sending(modules) == [], sending(modules)


def test_status_imports_nothing_that_sends(modules_of: Path, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "runs.jsonl", mixed_records(10))
    upload = loaded(modules_of, ["upload", "--emulate", str(manifest)])
    assert "aiohttp" in upload  # the hook sees what an upload loads
    checkpoint = tmp_path / "runs.emulated.batchlog-checkpoint"
    modules = loaded(modules_of, ["status", str(checkpoint)])
    assert "batchlog.journal" in modules
    assert sending(modules) == [], sending(modules)
