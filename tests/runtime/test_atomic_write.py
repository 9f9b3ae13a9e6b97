"""Files appear whole or not at all: the atomic-write helper, and save_checkpoint through it."""

import pytest
import torch

from sdxl_core.runtime.atomic_write import atomic_write, check_writable


def test_a_complete_write_replaces_the_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as handle:
        handle.write(b"new")
        assert target.read_bytes() == b"old"  # the old content stays readable until the new one is complete
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt(), ValueError("bad")])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_write(target) as handle:
            handle.write(b"half")
            raise error
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_check_writable_names_the_problem(tmp_path):
    check_writable(tmp_path / "new.png")
    with pytest.raises(ValueError, match="does not exist; create it first"):
        check_writable(tmp_path / "missing" / "x.png")
    with pytest.raises(ValueError, match="is a folder; name a file inside it"):
        check_writable(tmp_path)
    (tmp_path / "plain").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        check_writable(tmp_path / "plain" / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # the probe file is gone


def test_an_interrupted_save_checkpoint_leaves_nothing(tiny_base, tmp_path, monkeypatch):
    """A Ctrl-C halfway through writing the tensors (here: while one is converted) leaves no file at all."""
    from sdxl_core.checkpoints import loading

    real_lazy = loading._lazy
    calls = []

    def interrupting(tensor, dtype):
        lazy = real_lazy(tensor, dtype)
        calls.append(lazy)
        if len(calls) == 20:
            def interrupt():
                raise KeyboardInterrupt
            return type(lazy)(shape=lazy.shape, dtype=lazy.dtype, origin=lazy.origin, loader=interrupt)
        return lazy

    monkeypatch.setattr(loading, "_lazy", interrupting)
    with pytest.raises(KeyboardInterrupt):
        loading.save_checkpoint(tiny_base, tmp_path / "model.safetensors", dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
