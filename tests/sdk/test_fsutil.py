import pytest

from pocketpeft.errors import StoreError
from pocketpeft.fsutil import atomic_dir, write_bytes_atomic


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as d:
        (d / "a").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "a").write_text("half-written v2")
            raise RuntimeError("crash mid-write")
    assert (target / "a").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "staging directory cleaned up"
    with atomic_dir(target) as d:
        (d / "a").write_text("v2")
    assert (target / "a").read_text() == "v2"


def test_unwritable_location_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot write"):
        with atomic_dir(blocker / "adapter"):
            pass
    with pytest.raises(OSError):
        write_bytes_atomic(blocker / "x.json", b"{}")
