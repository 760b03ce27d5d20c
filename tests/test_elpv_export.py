from __future__ import annotations

from pathlib import Path

import pytest

from csflow.data import DatasetError, load_dataset
from csflow.elpv import ElpvExport, export_elpv


def test_export_is_reproducible_and_in_mvtec_layout(tmp_path: Path) -> None:
    a = export_elpv(tmp_path / "a", ElpvExport(seed=3))
    b = export_elpv(tmp_path / "b", ElpvExport(seed=3))
    assert a == b == {"train/good": 470, "test/good": 118, "test/defective": 313}
    names = {p.name for p in (tmp_path / "a/test/good").iterdir()}
    assert names == {p.name for p in (tmp_path / "b/test/good").iterdir()}
    assert not names & {p.name for p in (tmp_path / "a/train/good").iterdir()}
    dataset = load_dataset(tmp_path / "a")
    assert len(dataset.train) == 470 and dataset.defect_types == ["defective"]


def test_other_seed_gives_other_split_and_rerun_is_skipped(tmp_path: Path) -> None:
    export_elpv(tmp_path / "a", ElpvExport(seed=0))
    first = {p.name for p in (tmp_path / "a/test/good").iterdir()}
    export_elpv(tmp_path / "a", ElpvExport(seed=1))
    second = {p.name for p in (tmp_path / "a/test/good").iterdir()}
    assert first != second and len(first) == len(second)
    before = (tmp_path / "a/export.json").stat().st_mtime_ns
    export_elpv(tmp_path / "a", ElpvExport(seed=1))
    assert (tmp_path / "a/export.json").stat().st_mtime_ns == before


def test_unknown_cell_type(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cell type"):
        export_elpv(tmp_path, ElpvExport(cell_type="thin-film"))
