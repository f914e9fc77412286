"""Staged outputs: dials.vmerge writes scaled.refl before merging, under a temporary name that
becomes the real one only when the whole job succeeds."""

import os

import pytest

from dials_vmerge.io.atomic import StagedOutputs


def test_staged_files_appear_only_when_the_block_succeeds(tmp_path):
    final = tmp_path / "scaled.refl"
    final.write_bytes(b"old")
    with StagedOutputs() as staged:
        temp = staged.path_for(str(final))
        with open(temp, "wb") as f:
            f.write(b"new")
        # readable under its temporary name while the job goes on; the old file is untouched
        assert open(temp, "rb").read() == b"new" and final.read_bytes() == b"old"
    assert final.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["scaled.refl"]


def test_staged_files_are_removed_when_the_block_fails(tmp_path):
    final = tmp_path / "scaled.refl"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with StagedOutputs() as staged:
            for name in ("scaled.expt", "scaled.refl"):
                with open(staged.path_for(str(tmp_path / name)), "wb") as f:
                    f.write(b"new")
            raise RuntimeError("merging failed")
    assert final.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["scaled.refl"]
