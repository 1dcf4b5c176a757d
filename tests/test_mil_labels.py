"""Labels CSV: validation, matching to the archive, and the errors (typed, naming the lines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from wsi_ssl.errors import ConfigError, EmbeddingsNotFoundError, EmptyBagError, LabelsError
from wsi_ssl.mil import match_labels, read_labels
from wsi_ssl.testing.bags import write_bag_store

ENC = "random-cnn-0123456789ab"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six bag stores with catalog names, one unlabelled, one without embeddings."""
    root = tmp_path_factory.mktemp("labels") / "archive"
    rng = np.random.default_rng(0)
    for i in range(6):
        write_bag_store(
            root, f"{i:016x}", rng.normal(size=(5 + i, 8)), encoder_id=ENC, name=f"case-{i}.svs"
        )
    write_bag_store(root, "e" * 16, np.zeros((0, 8)), encoder_id=ENC, name="blank.svs")
    write_bag_store(root, "f" * 16, rng.normal(size=(4, 8)), encoder_id="other-enc", name="x.svs")
    return root


def write(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_ids_names_and_stems_and_reports_unlabelled(archive: Path, tmp_path: Path) -> None:
    csv = write(
        tmp_path,
        "\ufeffSlide,Label,patient,extra\n"  # BOM, capitals and an extra column are fine
        f"{0:016x},tumour,p1,a\n"
        "case-1.svs,normal,p1,b\n"
        "\n"
        "case-2,tumour,p2,c\n"
        "case-3.svs,normal,p3,d\n",
    )
    report = match_labels(archive, csv, "random-cnn")  # a unique prefix of the encoder id
    assert report.encoder_id == ENC and report.in_dim == 8
    assert report.classes == ["normal", "tumour"]
    assert [(s.name, s.label, s.y, s.patient, s.line) for s in report.slides] == [
        ("case-0.svs", "tumour", 1, "p1", 2),
        ("case-1.svs", "normal", 0, "p1", 3),
        ("case-2.svs", "tumour", 1, "p2", 5),
        ("case-3.svs", "normal", 0, "p3", 6),
    ]
    assert report.n_patients == 3
    assert sorted(report.unlabelled) == sorted([f"{4:016x}", f"{5:016x}", "e" * 16, "f" * 16])
    text = "\n".join(report.lines())
    assert "4 labelled slides" in text and "4 stores have no label" in text
    assert "case-4.svs" in text


def test_tab_separated_and_numeric_classes_sort_numerically(archive: Path, tmp_path: Path) -> None:
    csv = write(tmp_path, "slide\tlabel\ncase-0\t10\ncase-1\t2\ncase-2\t2\n")
    assert read_labels(csv).classes == ["2", "10"]


@pytest.mark.parametrize(
    ("text", "match", "rows"),
    [
        ("name,label\na,1\n", r"missing column slide .*line 1 has: name, label", [1]),
        ("slide,grade\na,1\n", r"missing column label", [1]),
        ("slide,label\na,1\nb,0\na,0\n", r"listed more than once, e.g. 'a' on lines 2, 4", [2, 4]),
        ("slide,label\na,1\nb,\n", r"empty 'label' on line 3", [3]),
        ("slide,label,patient\na,1,p\nb,0,\n", r"empty 'patient' on line 3", [3]),
        ("slide,label,fold\na,1,0\nb,0,one\n", r"'fold' is not an integer on line 3", [3]),
        (
            "slide,label,patient,fold\na,1,p,0\nb,0,p,1\nc,0,q,1\n",
            r"patient 'p' is in folds \[0, 1\]",
            [2, 3],
        ),
        ("slide,label\na,1\nb,1\n", r"only one class \('1'\)", [2, 3]),
        ("", r"empty file", []),
        ("slide,label\n", r"no rows", []),
    ],
)
def test_bad_csv_is_a_labels_error_naming_the_lines(
    tmp_path: Path, text: str, match: str, rows: list[int]
) -> None:
    with pytest.raises(LabelsError, match=match) as info:
        read_labels(write(tmp_path, text))
    assert isinstance(info.value, ValueError)
    assert info.value.rows == rows


def test_unknown_slides_name_their_lines(archive: Path, tmp_path: Path) -> None:
    csv = write(tmp_path, "slide,label\ncase-0.svs,a\nnope.svs,b\ncase-1,b\nmissing,a\n")
    with pytest.raises(LabelsError, match=r"2 labelled slide\(s\) have no complete store") as info:
        match_labels(archive, csv, ENC)
    assert info.value.rows == [3, 5]
    assert "'nope.svs', 'missing'" in str(info.value) and "skip_missing=True" in str(info.value)
    assert "--" not in str(info.value) and info.value.parameters == ("skip_missing",)
    report = match_labels(archive, csv, ENC, skip_missing=True)
    assert [r.line for r in report.missing] == [3, 5]
    assert len(report.slides) == 2
    assert "left out 2 labelled slides with no complete store" in "\n".join(report.lines())


def test_two_rows_for_one_store_and_slides_without_embeddings(
    archive: Path, tmp_path: Path
) -> None:
    csv = write(tmp_path, f"slide,label\ncase-0.svs,a\n{0:016x},b\ncase-1,b\n")
    with pytest.raises(LabelsError, match="lines 2, 3 name the same slide") as info:
        match_labels(archive, csv, ENC)
    assert info.value.rows == [2, 3]
    csv = write(tmp_path, "slide,label\ncase-0,a\nx.svs,b\ncase-1,b\n")
    with pytest.raises(LabelsError, match=rf"no embeddings '{ENC}' \(line 3\)"):
        match_labels(archive, csv, ENC)
    report = match_labels(archive, csv, ENC, skip_missing=True)
    assert [r.slide for r in report.no_embeddings] == ["x.svs"]
    with pytest.raises(EmbeddingsNotFoundError, match="available: other-enc, random-cnn"):
        match_labels(archive, csv, "resnet50")
    # no encoder named, and the labelled slides have two: say which, and how to choose
    with pytest.raises(
        ConfigError, match=r"embeddings of 2 encoders .*pass the encoder id"
    ) as info:
        match_labels(archive, csv, None)
    assert info.value.parameters == ("encoder",)  # the storage rule, as for export and index


def test_skip_missing_leaves_out_damaged_embeddings_too(archive: Path, tmp_path: Path) -> None:
    """A labelled slide whose embeddings lost a chunk file is left out and reported by
    skip_missing (the run stopped at its first epoch with the slide's damage)."""
    import shutil

    root = shutil.copytree(archive, tmp_path / "archive")
    chunk = root / "slides" / f"{2:016x}.zarr" / "embeddings" / ENC / "c" / "0" / "0"
    chunk.unlink()
    csv = write(tmp_path, "slide,label\ncase-0,a\ncase-1,b\ncase-2,a\ncase-3,b\n")
    report = match_labels(root, csv, ENC, skip_missing=True)
    assert [r.slide for r in report.no_embeddings] == ["case-2"]
    assert [s.name for s in report.slides] == ["case-0.svs", "case-1.svs", "case-3.svs"]


def test_skipping_can_leave_one_class(archive: Path, tmp_path: Path) -> None:
    csv = write(tmp_path, "slide,label\ncase-0,a\ncase-1,a\nnope,b\n")
    with pytest.raises(LabelsError, match="only one class"):
        match_labels(archive, csv, ENC, skip_missing=True)


def test_empty_bag_is_a_typed_error(archive: Path, tmp_path: Path) -> None:
    csv = write(tmp_path, "slide,label\ncase-0,a\nblank.svs,b\ncase-1,b\n")
    with pytest.raises(EmptyBagError, match=r"blank.svs .*labels line 3.*0 tiles"):
        match_labels(archive, csv, ENC)
    report = match_labels(archive, csv, ENC, skip_missing=True)
    assert [r.line for r in report.empty] == [3]


def test_cli_prints_one_line_naming_the_rows(archive: Path, tmp_path: Path) -> None:
    csv = write(tmp_path, "slide,label\ncase-0,a\nnope,b\ncase-1,b\n")
    code, out, err = run_cli(
        ["mil", "train", str(archive), "--labels", str(csv), "--out", str(tmp_path / "run")]
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("wsi-ssl: error: ")
    assert "line 3" in err and "'nope'" in err
    assert not (tmp_path / "run").exists()
    csv = write(tmp_path, "slide,label\ncase-0,a\ncase-1,a\n")
    code, _, err = run_cli(
        ["mil", "train", str(archive), "--labels", str(csv), "--out", str(tmp_path / "run")]
    )
    assert code == 2 and "only one class" in err and err.count("\n") == 1


def test_fewer_patients_than_folds(archive: Path, tmp_path: Path) -> None:
    from wsi_ssl.mil import train

    csv = write(tmp_path, "slide,label\ncase-0,a\ncase-1,a\ncase-2,b\ncase-3,b\ncase-4,b\n")
    with pytest.raises(
        LabelsError, match=r"class 'a' has 2 patient\(s\), fewer than folds=3"
    ) as info:
        train(archive, csv, ENC, tmp_path / "run", folds=3)
    assert info.value.parameters == ("folds",)
    assert "use folds=2 or fewer" in str(info.value)
    # one patient: no folds setting helps (it advised "use folds=2 or fewer" with folds=2)
    one = write(tmp_path, "slide,label\ncase-0,a\ncase-2,b\ncase-3,b\ncase-4,b\n")
    with pytest.raises(LabelsError, match=r"class 'a' has 1 patient\(s\)") as info:
        train(archive, one, ENC, tmp_path / "run", folds=2)
    assert "label more slides of it" in str(info.value) and "use folds" not in str(info.value)
    # folds from the CSV, each holding one class: the column is to change, not the setting
    by_class = write(tmp_path, "slide,label,fold\ncase-0,a,0\ncase-1,a,0\ncase-2,b,1\ncase-3,b,1\n")
    with pytest.raises(LabelsError, match="single class") as info:
        train(archive, by_class, ENC, tmp_path / "run")
    assert "'fold' column" in str(info.value) and "fewer folds" not in str(info.value)


def test_slide_labels_derived_from_the_label_loop_regions(archive: Path, tmp_path: Path) -> None:
    """The web page's labels/regions.csv -> a slide,label CSV (serve.labels.write_slide_labels)
    that MIL training matches: a slide takes the label of its regions, a slide whose regions
    disagree is left out."""
    import shutil

    from wsi_ssl.serve.labels import LabelBook, write_slide_labels

    root = tmp_path / "archive"
    shutil.copytree(archive, root)
    book = LabelBook(root)
    for i, label in enumerate(("tumour", "normal", "tumour", "normal")):
        book.set((f"{i:016x}", 0, 0, 100, 100, label), "accept", f"case-{i}.svs", (10**6, 10**6))
    book.set((f"{4:016x}", 0, 0, 50, 50, "tumour"), "accept", "case-4.svs", (10**6, 10**6))
    book.set(
        (f"{4:016x}", 60, 60, 50, 50, "normal"), "accept", "case-4.svs", (10**6, 10**6)
    )  # disagrees
    csv = write_slide_labels(root)
    table = read_labels(csv)
    assert {r.slide: r.label for r in table.rows} == {
        f"{i:016x}": label for i, label in enumerate(("tumour", "normal", "tumour", "normal"))
    }
    report = match_labels(root, csv, ENC)
    assert report.classes == ["normal", "tumour"] and report.class_counts == {
        "normal": 2,
        "tumour": 2,
    }
    assert sorted(s.name for s in report.slides) == [f"case-{i}.svs" for i in range(4)]


def test_config_errors_name_fields_and_the_cli_adds_flags(tmp_path: Path) -> None:
    from wsi_ssl.mil import MILConfig

    with pytest.raises(ConfigError, match="hidden_dim 30 must be a multiple of n_heads 8") as info:
        MILConfig(model="transmil", hidden_dim=30)
    assert info.value.parameters == ("hidden_dim", "n_heads")
    with pytest.raises(ConfigError, match="folds must be >= 2") as info:
        MILConfig(folds=1)
    assert info.value.parameters == ("folds",) and "--" not in str(info.value)
    argv = ["mil", "train", str(tmp_path), "--labels", "l.csv", "--out", str(tmp_path / "r")]
    code, _, err = run_cli([*argv, "--folds", "1"])
    assert code == 2 and err.strip().endswith("got 1 (command line: --folds)")
