"""All-or-nothing writes: the previous directory survives a failed replacement, no temporary is left behind."""

import pytest

from hass_deploy.atomic import replacing_directory, write_text


def test_a_finished_block_replaces_the_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with replacing_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # nothing visible until the block ends
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_block_leaves_the_previous_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), replacing_directory(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_text_replaces_a_file(tmp_path):
    path = tmp_path / "a" / "state.json"
    write_text(path, "1")
    write_text(path, "2")
    assert path.read_text() == "2" and [p.name for p in path.parent.iterdir()] == ["state.json"]
