"""The embedding job, its store arrays and the MIL exports, on real Zarr stores of real tiles."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import wsi_ssl
from tests.conftest import run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import EmbedConfig, embed, embed_slide, export
from wsi_ssl.embedding.job import precision_note
from wsi_ssl.encoders import EncoderConfig, create_encoder, register_encoder
from wsi_ssl.encoders._builtin import SmallCNN
from wsi_ssl.errors import (
    ConfigError,
    EmbeddingsCorruptError,
    EmbeddingsIncompleteError,
    EmbeddingsNotFoundError,
    InputSizeMismatchError,
    NonFiniteEmbeddingError,
    StoreCorruptError,
    StoreIncompleteError,
)
from wsi_ssl.storage import SlideStore, open_store
from wsi_ssl.storage.atomic import host_name
from wsi_ssl.storage.embeddings import (
    PARTIAL_PREFIX,
    EmbeddingWriter,
    embedding_ids,
    embedding_status,
    embeddings_problem,
    read_embeddings,
)
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

# 224 px lossless tiles (what random-cnn takes), 16 tiles per shard: CMU-1-Small -> 52 tiles
TILING = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16)
FAST = EmbedConfig(batch_size=16, device="cpu", workers=0)


@pytest.fixture(scope="module")
def cmu_root(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> Path:
    root = tmp_path_factory.mktemp("cmu")
    tile_slide(cmu_small, root, TILING)
    return root


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic slides of different sizes, every grid tile kept (35 and 25 tiles)."""
    base = tmp_path_factory.mktemp("synth")
    for seed, size in ((1, (1400, 1100)), (2, (1100, 900))):
        path = write_synthetic_slide(base / f"s{seed}.tiff", size, seed=seed)
        tile_slide(path, base / "root", replace(TILING, tissue_threshold=0.0))
    return base / "root"


def _copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def _only(root: Path) -> SlideStore:
    archive = open_store(root)
    [sid] = archive.slide_ids
    return archive.slide(sid)


def test_embed_shape_alignment_and_provenance(cmu_root: Path, tmp_path: Path) -> None:
    root = _copy(cmu_root, tmp_path / "root")
    enc = create_encoder("random-cnn")
    summary = embed(root, enc, FAST, workers=1)  # one decoding worker process
    assert [r.status for r in summary.outcomes] == ["complete"] and not summary.failed
    store = _only(root)
    emb = read_embeddings(store, enc.encoder_id)
    assert emb.features.shape == (store.n_tiles, 64) == (72, 64)
    assert emb.features.dtype == np.float16
    assert np.array_equal(emb.coords, store.coords)
    # row i is tile i: recompute with the same batch boundaries, straight from the tiles
    tiles = store.tiles[:]
    direct = np.concatenate(
        [enc(torch.from_numpy(tiles[a : a + 16])).numpy() for a in range(0, len(tiles), 16)]
    ).astype(np.float16)
    assert np.array_equal(emb.features, direct)
    assert len(np.unique(emb.features, axis=0)) == len(tiles)
    a = emb.attrs
    assert a["status"] == "complete" and a["encoder_id"] == enc.encoder_id
    assert EncoderConfig.from_dict(a["encoder"]) == enc.config
    assert a["weights_sha256"] == enc.config.weights_sha256 and a["dtype"] == "float16"
    assert a["compute"]["device"] == "cpu" and a["tiling"]["tile_size"] == 224
    lazy = read_embeddings(store, enc.encoder_id, lazy=True)
    assert np.array_equal(lazy.features.compute(), emb.features)
    d = summary.to_dict()
    assert d["complete"] == 1 and d["tiles_embedded"] == 72 and d["encoder_id"] == enc.encoder_id
    json.dumps(d)


def test_bitwise_deterministic_across_runs_and_workers(cmu_root: Path, tmp_path: Path) -> None:
    runs = []
    # decoding in the main process, in 2 worker processes, and under
    # torch.use_deterministic_algorithms (which must be restored afterwards)
    for i, options in enumerate(({"workers": 0}, {"workers": 2}, {"deterministic": True})):
        root = _copy(cmu_root, tmp_path / f"r{i}")
        s = embed(root, "random-cnn", FAST, dtype="float32", batch_size=32, **options)
        assert not s.failed
        runs.append(read_embeddings(_only(root), s.encoder_id).features)
    assert not torch.are_deterministic_algorithms_enabled()
    assert runs[0].dtype == np.float32
    for other in runs[1:]:
        assert np.array_equal(runs[0].view(np.uint32), other.view(np.uint32))


def test_embed_region_of_a_tile_matches_its_vector(cmu_root: Path, tmp_path: Path) -> None:
    """Level-0 tiles (CMU is 0.499 µm/px) stored losslessly: the region read gives the tile."""
    root = _copy(cmu_root, tmp_path / "root")
    enc = create_encoder("random-cnn")
    embed(root, enc, FAST, dtype="float32", batch_size=1)
    store = _only(root)
    emb = read_embeddings(store, enc.encoder_id)
    i = 7
    x, y = (int(v) for v in store.coords[i])
    size0 = round(store.tiling["tile_size_level0"])
    assert np.array_equal(
        enc.embed_region(store.source["path"], (x, y, size0, size0)), emb.features[i]
    )


def test_resume_skips_complete_and_redoes_half_written(synth_root: Path, tmp_path: Path) -> None:
    root = _copy(synth_root, tmp_path / "root")
    enc = create_encoder("random-cnn")
    first = embed(root, enc, FAST)
    assert [r.status for r in first.outcomes] == ["complete", "complete"]
    archive = open_store(root)
    a, b = (archive.slide(s) for s in archive.slide_ids)
    want = read_embeddings(b, enc.encoder_id).features
    again = embed(root, enc, FAST)
    assert [r.status for r in again.outcomes] == ["skipped", "skipped"]
    # a job killed while writing b: partial array beside an unreadable status
    w = EmbeddingWriter(b.path, enc.encoder_id, n_rows=b.n_tiles, dim=64, chunk_rows=4)
    w.write(0, np.zeros((8, 64), np.float32))
    w._locks.close()  # the writing process died: the kernel dropped its locks
    (b.path / "embeddings" / enc.encoder_id / "zarr.json").write_text("{trunc")
    assert embedding_status(b, enc.encoder_id) == "writing"
    with pytest.raises(EmbeddingsIncompleteError, match="re-run `wsi-ssl embed`"):
        read_embeddings(b, enc.encoder_id)
    assert embedding_ids(b) == []
    resumed = embed(root, enc, FAST)
    assert [r.status for r in resumed.outcomes] == ["skipped", "complete"]
    assert np.array_equal(read_embeddings(b, enc.encoder_id).features, want)
    assert not list((b.path / "embeddings").glob(f"{PARTIAL_PREFIX}*"))
    # another dtype is another output: redone, not skipped
    f32 = embed(root, enc, FAST, dtype="float32", slides=[a.slide_id])
    assert [r.status for r in f32.outcomes] == ["complete"]
    assert read_embeddings(a, enc.encoder_id).features.dtype == np.float32


_KILLED_JOB = textwrap.dedent(
    """
    import sys, time
    from wsi_ssl.encoders import Encoder
    from wsi_ssl.cli.main import main

    forward = Encoder.forward_preprocessed
    def slow(self, x):  # same vectors, just slow enough to be killed mid-slide
        time.sleep(0.15)
        return forward(self, x)
    Encoder.forward_preprocessed = slow

    sys.exit(main(["embed", sys.argv[1], "--encoder", "random-cnn", "--device", "cpu",
                   "--workers", "1", "--batch-size", "4", "--quiet"]))
    """
)


@pytest.mark.faults
def test_resume_after_sigkill_mid_slide(synth_root: Path, tmp_path: Path) -> None:
    reference = _copy(synth_root, tmp_path / "ref")
    embed(reference, "random-cnn", FAST, batch_size=4)
    root = _copy(synth_root, tmp_path / "killed")
    archive = open_store(root)
    second = archive.slide(archive.slide_ids[1])
    partial = (
        second.path / "embeddings" / f"{PARTIAL_PREFIX}{create_encoder('random-cnn').encoder_id}"
    )
    first = archive.slide(archive.slide_ids[0])
    eid = create_encoder("random-cnn").encoder_id
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_JOB, str(root)])
    try:
        deadline = time.monotonic() + 90
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a few batches into the second slide
        assert proc.poll() is None, "the job ended before it could be killed mid-slide"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert embedding_status(first, eid) == "complete"  # committed before the second began
    assert embedding_status(second, eid) == "writing" and embedding_ids(second) == []
    resumed = embed(root, "random-cnn", FAST, batch_size=4)
    assert [r.status for r in resumed.outcomes] == ["skipped", "complete"]
    ref = open_store(reference)
    for sid in archive.slide_ids:
        got = read_embeddings(archive.slide(sid), eid).features
        assert np.array_equal(got, read_embeddings(ref.slide(sid), eid).features), sid


def test_incomplete_and_missing_stores(synth_root: Path, tmp_path: Path) -> None:
    root = _copy(synth_root, tmp_path / "root")
    archive = open_store(root)
    a, b = archive.slide_ids
    SlideStore.open(archive.store_path(b), mode="r+").group.attrs["status"] = "writing"
    s = embed(root, "random-cnn", FAST)
    assert [r.slide for r in s.outcomes] == [a] and s.incomplete == [b]
    s = embed(root, "random-cnn", FAST, slides=[b, "0123456789abcdef"])
    assert [r.error_type for r in s.outcomes] == ["StoreIncompleteError", "UnknownSlideError"]
    assert "not 'complete'" in (s.outcomes[0].error or "")
    name = archive.catalog.get(a).name  # type: ignore[union-attr]
    assert f"the archive's slides: {name} (" in (s.outcomes[1].error or "")  # complete ones
    with pytest.raises(StoreIncompleteError):
        embed_slide(root, b, "random-cnn", FAST)


def test_input_size_mismatch_is_an_error_unless_the_config_resizes(
    synth_root: Path, tmp_path: Path
) -> None:
    root = _copy(synth_root, tmp_path / "root")
    sid = open_store(root).slide_ids[0]
    with pytest.raises(InputSizeMismatchError, match=r"tiles are 224 px.*takes 256 px"):
        embed_slide(root, sid, create_encoder("random-cnn", input_size=256), FAST)
    enc = create_encoder("random-cnn", input_size=256, resize="bilinear")
    assert embed_slide(root, sid, enc, FAST).status == "complete"
    assert embedding_ids(open_store(root).slide(sid)) == [enc.encoder_id]


class _Poisoned(torch.nn.Module):
    """random-cnn weights, but tile ``k`` of the job (in order) gets ``value`` in its vector."""

    k = 5
    value = float("nan")

    def __init__(self) -> None:
        super().__init__()
        self.cnn = SmallCNN()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cnn(x)
        if self.seen <= self.k < self.seen + len(x):
            out[self.k - self.seen, 3] = self.value
        self.seen += len(x)
        return out


@register_encoder(
    "test-poisoned", arch="builtin/poisoned", input_size=224, embed_dim=64, source="random"
)
def _poisoned(config: EncoderConfig) -> torch.nn.Module:
    return _Poisoned()


@pytest.mark.parametrize(("value", "what"), [(float("nan"), "NaN"), (1e6, "beyond float16")])
def test_nonfinite_vectors_fail_the_slide_with_its_tile(
    synth_root: Path, tmp_path: Path, value: float, what: str
) -> None:
    root = _copy(synth_root, tmp_path / "root")
    _Poisoned.value = value
    enc = create_encoder("test-poisoned")
    s = embed(root, enc, FAST, batch_size=4)  # tile 5 of the first slide: its second batch
    first, second = s.outcomes
    assert first.status == "failed" and first.error_type == "NonFiniteEmbeddingError"
    store = open_store(root).slide(first.slide)
    x, y = store.coords[5]
    assert f"tile 5 (level-0 x={x}, y={y})" in (first.error or "") and what in (first.error or "")
    assert str(store.path) in (first.error or "")
    assert second.status == "complete"  # failure isolation
    assert embedding_status(store, enc.encoder_id) == "missing"
    if value == 1e6:  # float32 holds it
        enc = create_encoder("test-poisoned")
        s = embed(root, enc, FAST, batch_size=4, dtype="float32", slides=[first.slide])
        assert s.outcomes[0].status == "complete"
    else:
        with pytest.raises(NonFiniteEmbeddingError):
            embed_slide(root, first.slide, create_encoder("test-poisoned"), FAST, batch_size=4)


def test_disk_full_mid_write_leaves_nothing_complete(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(synth_root, tmp_path / "root")
    archive = open_store(root)
    victim = archive.slide(archive.slide_ids[0])
    original = zarr.storage.LocalStore.set

    async def full_disk(self: zarr.storage.LocalStore, key: str, value: object) -> None:
        # the second chunk of the victim's partial array: some rows are already on disk
        if victim.slide_id in str(self.root) and PARTIAL_PREFIX in key and key.endswith("/c/1/0"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)  # type: ignore[arg-type]

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_disk)
    enc = create_encoder("random-cnn")
    s = embed(root, enc, FAST, batch_size=4, chunk_rows=4)
    first, second = s.outcomes
    assert first.status == "failed" and first.error_type == "EmbeddingWriteError"
    assert "No space left on device" in (first.error or "") and "free disk space" in first.error
    assert embedding_status(victim, enc.encoder_id) == "missing"
    assert not (victim.path / "embeddings" / f"{PARTIAL_PREFIX}{enc.encoder_id}").exists()
    assert second.status == "complete"


def test_unreadable_tiles_fail_only_that_slide(synth_root: Path, tmp_path: Path) -> None:
    root = _copy(synth_root, tmp_path / "root")
    archive = open_store(root)
    victim = archive.slide(archive.slide_ids[1])
    shard = sorted(p for p in (victim.path / "tiles" / "c").rglob("*") if p.is_file())[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated shard
    s = embed(root, "random-cnn", FAST, workers=1)
    assert [r.status for r in s.outcomes] == ["complete", "failed"]
    assert s.outcomes[1].error_type == "TileReadError" and "tiles 0..15" in s.outcomes[1].error
    assert s.outcomes[1].error.count("re-tile this slide") == 1  # the loader's detail, once
    exc = s.outcomes[1].exception
    assert exc is not None and exc.parameters == ()  # embed's flags cannot fix the tiles
    slides = s.to_dict()["slides"]
    assert [e["slide_id"] for e in slides] == [o.slide for o in s.outcomes]


def test_missing_tile_shard_fails_the_slide_not_blank_vectors(
    synth_root: Path, tmp_path: Path
) -> None:
    root = _copy(synth_root, tmp_path / "root")
    archive = open_store(root)
    victim = archive.slide(archive.slide_ids[0])
    (victim.path / "tiles" / "c" / "1" / "0" / "0" / "0").unlink()
    s = embed(root, "random-cnn", FAST, workers=1)
    assert [r.status for r in s.outcomes] == ["failed", "complete"]
    assert s.outcomes[0].error_type == "TileReadError"
    assert "shard file is missing" in (s.outcomes[0].error or "")


def test_damaged_embeddings_are_refused_downstream(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A complete embeddings array that lost a chunk (NaN fill) or holds an undecodable one is
    an error naming the slide, never NaN vectors in an export or an index."""
    root = _copy(synth_root, tmp_path / "root")
    summary = embed(root, "random-cnn", FAST, workers=1)
    store = _only_first(root)
    chunks = store.path / "embeddings" / summary.encoder_id / "c"
    first = sorted(p for p in chunks.rglob("*") if p.is_file())[0]
    data = first.read_bytes()
    first.unlink()
    with pytest.raises(EmbeddingsCorruptError, match="1 of 1 chunk files missing") as info:
        read_embeddings(store, summary.encoder_id)
    assert f"`wsi-ssl check {root}` prints the embed command" in str(info.value)  # no ROOT
    first.write_bytes(data[: len(data) // 2])
    with pytest.raises(EmbeddingsCorruptError, match=str(store.path.name)):
        read_embeddings(store, summary.encoder_id)
    for argv, code in (
        (
            ["export", str(root), "--out", str(tmp_path / "pt"), "--format", "pt", "--quiet"],
            1,
        ),  # others go on
        (["index", str(root), "--encoder", summary.encoder_id, "--quiet"], 1),  # others go in
    ):
        assert _cli(argv) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "are damaged" in err[0] and f"wsi-ssl check {root}`" in err[0]
    assert len(list((tmp_path / "pt").glob("*.pt"))) == 1  # the intact slide only


def _only_first(root: Path) -> SlideStore:
    archive = open_store(root)
    return archive.slide(archive.slide_ids[0])


def test_export_clam_h5_and_pt_round_trip(cmu_root: Path, tmp_path: Path) -> None:
    import h5py

    root = _copy(cmu_root, tmp_path / "root")
    enc = create_encoder("random-cnn")
    embed(root, enc, FAST)
    store = _only(root)
    emb = read_embeddings(store, enc.encoder_id)
    result = export(root, tmp_path / "h5", encoder="random-cnn")
    [path] = result.files
    assert path == tmp_path / "h5" / "CMU-1-Small-Region.h5" and not result.failed
    with h5py.File(path, "r") as f:
        feats, coords = f["features"], f["coords"]
        assert feats.dtype == np.float32 and coords.dtype == np.int64
        assert np.array_equal(feats[:], emb.features.astype(np.float32))
        assert np.array_equal(coords[:], store.coords)
        c = dict(coords.attrs)
        assert c["patch_level"] == 0
        assert c["patch_size"] == c["patch_size_level0"] == round(store.tiling["tile_size_level0"])
        assert c["target_patch_size"] == 224
        assert c["level0_magnification"] == 20 and c["target_magnification"] == 20
        assert c["mpp"] == pytest.approx(0.499) and c["level0_mpp"] == pytest.approx(0.499)
        assert list(c["level_dim"]) == [2220, 2967] and c["name"] == "CMU-1-Small-Region"
        assert feats.attrs["encoder_id"] == enc.encoder_id
        assert json.loads(feats.attrs["encoder"])["name"] == "random-cnn"
    manifest = json.loads((tmp_path / "h5" / "export.json").read_text())
    assert manifest["encoder_id"] == enc.encoder_id and manifest["slides"][0]["n_tiles"] == 72

    result = export(root, tmp_path / "pt", format="pt", name_by="slide_id")
    [path] = result.files
    assert path.name == f"{store.slide_id}.pt"
    feats = torch.load(path, weights_only=True)
    coords = torch.load(tmp_path / "pt" / "coords" / path.name, weights_only=True)
    assert feats.dtype == torch.float32 and torch.equal(
        feats, torch.from_numpy(emb.features.astype(np.float32))
    )
    assert torch.equal(coords, torch.from_numpy(store.coords))
    with pytest.raises(EmbeddingsNotFoundError, match="available: random-cnn-"):
        export(root, tmp_path / "x", encoder="resnet50")


def _cli(argv: list[str]) -> int:
    """The ``wsi-ssl`` entry point itself (cli/main.py)."""
    from wsi_ssl.cli.main import main

    return main(argv)


def test_cli_embed_and_export(
    cmu_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy(cmu_root, tmp_path / "root")
    common = ["--device", "cpu", "--workers", "0", "--batch-size", "16"]
    assert _cli(["embed", str(root), "--encoder", "random-cnn", "--json", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["complete"] == 1 and out["tiles_embedded"] == 72
    assert _cli(["embed", str(root), "--encoder", "random-cnn", *common]) == 0
    assert "1 already complete" in capsys.readouterr().out
    assert _cli(["export", str(root), "--out", str(tmp_path / "h5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exported"] == 1
    assert _cli(["export", str(root), "--out", str(tmp_path / "h5"), "--quiet"]) == 0  # as embed
    captured = capsys.readouterr()
    assert "exported" in captured.out and captured.err == ""  # no progress bar
    # a slide fails (NaN from the poisoned encoder): exit 1, one line per failed slide
    rc = _cli(["embed", str(root), "--encoder", "test-poisoned", "--quiet", *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("wsi-ssl: error: ")
    assert _cli(["embed", str(root), "--encoder", "nope", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_cli_tile_size_refusal_names_the_tile_flag(tmp_path: Path) -> None:
    """Tiles of 128 px for an encoder of 224 px that must not resize: the advice is worded
    with `wsi-ssl tile`'s flag (it said ``re-tile with tile_size=224``)."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (700, 500), seed=1)
    tile_slide(slide, tmp_path / "root", replace(TILING, tile_size=128, tissue_threshold=0.0))
    argv = ["embed", str(tmp_path / "root"), "--encoder", "random-cnn", "--resize", "never"]
    code, out, err = run_cli([*argv, "--device", "cpu", "--workers", "0", "--quiet"])
    advice = "re-tile with --tile-size 224 or choose --resize bilinear (a different encoder_id)"
    assert code == 1 and err.count("\n") == 1 and err.startswith("wsi-ssl: error: ")
    assert err.rstrip().endswith(advice) and "tile_size=" not in err
    [line] = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("InputSize")]
    assert line.endswith(advice)


def test_two_precisions_under_one_encoder_id_are_noted_only_when_devices_mix() -> None:
    """An encoder computing in bf16 or fp16 on CUDA runs in fp32 on the CPU: a job over CUDA
    and CPU devices stores one encoder id's vectors from both, and says so; on the CPU alone
    (where no other precision can be asked for) nothing is said."""
    bf16 = create_encoder("random-cnn", precision="bf16")
    assert precision_note(bf16, ["cuda:0", "cuda:1", "cpu"]) == (
        f"{bf16.encoder_id} computes in bf16 on cuda:0, cuda:1 but in fp32 on the CPU (autocast "
        "is used on CUDA only): its vectors, under one encoder id, come from two precisions "
        "(each slide's embeddings record which); --devices of one kind gives one"
    )
    fp16 = create_encoder("random-cnn", precision="fp16")
    assert "computes in fp16 on cuda:1 but" in (precision_note(fp16, ["cpu", "cuda:1"]) or "")
    assert precision_note(bf16, ["cpu"]) is None
    assert precision_note(bf16, ["cpu", "cpu"]) is None
    assert precision_note(bf16, ["cuda:0", "cuda:1"]) is None
    assert precision_note(create_encoder("random-cnn"), ["cuda:0", "cpu"]) is None  # fp32


def test_cli_on_the_cpu_says_nothing_of_the_precision(tmp_path: Path) -> None:
    """random-vit-small computes in bf16 on CUDA; a job on the CPU alone runs it in fp32, which
    no flag changes there, and prints no note on it (it did on every CPU run)."""
    root = tmp_path / "root"
    tile_slide(write_synthetic_slide(tmp_path / "s.tiff", (300, 300), seed=1), root, TILING)
    argv = ["embed", str(root), "--encoder", "random-vit-small", "--device", "cpu"]
    code, _, err = run_cli([*argv, "--slides", "nosuch", "--quiet"])
    [error] = err.splitlines()
    assert code == 1 and error.startswith("wsi-ssl: error: ") and "nosuch" in error


def test_cli_main_prints_one_line(cmu_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _cli(
        [
            "embed",
            str(cmu_root),
            "--encoder",
            "resnet50",
            "--weights",
            "/nonexistent/r50.pth",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "r50.pth: no such weights file" in err[0]


def test_public_api_embeds_and_reads_back(cmu_root: Path, tmp_path: Path) -> None:
    root = _copy(cmu_root, tmp_path / "root")
    summary = wsi_ssl.embed(root, "random-cnn", FAST)
    assert summary.outcomes[0].status == "complete"
    archive = open_store(root)
    emb = archive.embeddings(archive.slide_ids[0], summary.encoder_id)
    assert emb.features.shape == (72, 64)
    assert np.array_equal(emb.coords, archive.coords(archive.slide_ids[0])[:])
    # the encoder's settings by name, as `wsi-ssl embed --resize` (a raw TypeError before)
    resized = wsi_ssl.embed(root, "random-cnn", FAST, resize="bilinear")
    assert resized.encoder_id == create_encoder("random-cnn", resize="bilinear").encoder_id
    assert resized.outcomes[0].status == "complete" and resized.encoder_id != summary.encoder_id
    with pytest.raises(ConfigError, match=r"embed has no option 'resise'.*batch_size.*resize"):
        wsi_ssl.embed(root, "random-cnn", FAST, resise="bilinear")
    with pytest.raises(ConfigError, match="resize make an encoder: pass them to create_encoder"):
        wsi_ssl.embed(root, create_encoder("random-cnn"), FAST, resize="bilinear")


def test_wsi_ssl_pretrain_checkpoint_embeds_the_archive(cmu_root: Path, tmp_path: Path) -> None:
    """The demo path: a `wsi-ssl pretrain` run directory as the encoder (teacher backbone)."""
    try:
        from wsi_ssl.ssl import PretrainConfig, random_encoder
        from wsi_ssl.ssl.checkpoint import ENCODER_FORMAT, FORMAT_VERSION, save_checkpoint
        from wsi_ssl.ssl.encoder import describe_encoder
    except Exception as err:  # the pretraining package is absent or cannot load here
        pytest.skip(f"wsi_ssl.ssl unavailable: {type(err).__name__}: {err}")
    from wsi_ssl.embedding import embed_for_demo
    from wsi_ssl.encoders import file_sha256

    config = PretrainConfig.preset("cpu-small")
    ref = random_encoder(config, seed=0)  # stands in for a trained teacher: same format
    ckpt = save_checkpoint(
        tmp_path / "run" / "encoder.pt",
        {
            "format": ENCODER_FORMAT,
            "format_version": FORMAT_VERSION,
            "meta": {"config": config.to_dict(), "encoder": describe_encoder(config)},
            "teacher_backbone": ref.model.state_dict(),
        },
    )
    root = _copy(cmu_root, tmp_path / "root")
    summary = embed_for_demo(root, tmp_path / "run", progress=False)
    assert not summary.failed and summary.outcomes[0].status == "complete"
    store = _only(root)
    # the CNN trained on 64 px crops takes the whole 224 px tiles (the nuclei need them)
    enc = create_encoder(tmp_path / "run", input_size=224)
    assert summary.encoder_id == enc.encoder_id != create_encoder(tmp_path / "run").encoder_id
    assert enc.encoder_id.startswith(f"wsi-ssl-{config.arch}-")
    assert enc.config.source == "wsi-ssl" and enc.config.input_size == 224
    emb = read_embeddings(store, enc.encoder_id)
    assert emb.attrs["checkpoint_sha256"] == file_sha256(ckpt)
    assert emb.attrs["encoder"]["weights_path"] == str(ckpt.resolve())
    # the teacher's own vectors of the unresized tiles
    pixels = torch.from_numpy(store.tiles[:]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref.model((pixels - mean) / std).numpy()
    np.testing.assert_allclose(emb.features.astype(np.float32), want, rtol=1e-2, atol=1e-2)
    assert embed_for_demo(root, tmp_path / "run", progress=False).outcomes[0].status == "skipped"


def test_seed_is_refused_where_the_weights_come_from_a_file(cmu_root: Path, tmp_path: Path) -> None:
    """--seed only sets a random init: with a weights file it would be silently ignored."""
    weights = tmp_path / "cnn.pth"
    torch.save(create_encoder("random-cnn", seed=3).model.state_dict(), weights)
    root = _copy(cmu_root, tmp_path / "root")
    argv = ["embed", str(root), "--encoder", "random-cnn", "--quiet"]
    code, _, err = run_cli([*argv, "--weights", str(weights), "--seed", "3"])
    assert code == 2 and "--seed sets the weights of a random init" in err, err
    assert str(weights.resolve()) in err and not list(root.glob("slides/*/embeddings/*"))
    code, _, err = run_cli([*argv, "--seed", "3"])
    assert code == 0, err
    [store] = open_store(root).slide_ids
    [eid] = embedding_ids(open_store(root).slide(store))
    assert eid == create_encoder("random-cnn", seed=3).encoder_id


def test_a_pretrain_run_refuses_tiles_at_another_scale_than_it_trained_at(
    cmu_root: Path, tmp_path: Path
) -> None:
    """The run's checkpoint records its tiles' scale: embedding 224 px tiles at 0.5 µm/px with a
    run trained on 224 px tiles at 1.0 µm/px is refused like a preset at the wrong scale."""
    try:
        from wsi_ssl.ssl import PretrainConfig, random_encoder
        from wsi_ssl.ssl.checkpoint import ENCODER_FORMAT, FORMAT_VERSION, save_checkpoint
        from wsi_ssl.ssl.encoder import describe_encoder
    except Exception as err:  # the pretraining package is absent or cannot load here
        pytest.skip(f"wsi_ssl.ssl unavailable: {type(err).__name__}: {err}")

    config = PretrainConfig.preset("cpu-small")
    for mpp in (1.0, 0.5):
        save_checkpoint(
            tmp_path / f"run{mpp:g}" / "encoder.pt",
            {
                "format": ENCODER_FORMAT,
                "format_version": FORMAT_VERSION,
                "meta": {
                    "config": config.to_dict(),
                    "encoder": describe_encoder(config),
                    "sources": {"tile_size": 224, "mpp": mpp, "scales": {f"{mpp:g}": 52}},
                },
                "teacher_backbone": random_encoder(config, seed=int(mpp * 2)).model.state_dict(),
            },
        )
    size = config.global_crop_size
    assert create_encoder(tmp_path / "run1").config.mpp == (round(224 / size, 4),)
    root = _copy(cmu_root, tmp_path / "root")
    assert open_store(root).slide(open_store(root).slide_ids[0]).tiling["mpp"] == 0.5
    code, _, err = run_cli(["embed", str(root), "--encoder", str(tmp_path / "run1"), "--quiet"])
    assert (
        code == 1
        and "at 0.5 µm/px reach encoder" in err
        and "re-tile with --tile-size 224 and --mpp 1" in err
    ), err
    assert (
        embed(root, tmp_path / "run1", replace(FAST, check_mpp=False)).outcomes[0].status
        == "complete"
    )
    assert embed(root, tmp_path / "run0.5", FAST).outcomes[0].status == "complete"


# -- one writer, completeness by content, damaged stores (issue #10) ---------------------------

_HOLD_EMBEDDINGS = """
import sys
from wsi_ssl.storage.locks import embeddings_lock
with embeddings_lock(sys.argv[1], sys.argv[2], sys.argv[3]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_resume_redoes_embeddings_that_lost_a_chunk(synth_root: Path, tmp_path: Path) -> None:
    """Complete-looking attributes are not enough: a lost chunk file is redone on resume."""
    root = _copy(synth_root, tmp_path / "root")
    first = embed(root, "random-cnn", FAST, chunk_rows=8)
    archive = open_store(root)
    b = archive.slide(archive.slide_ids[1])
    want = read_embeddings(b, first.encoder_id).features
    (b.path / "embeddings" / first.encoder_id / "c" / "1" / "0").unlink()
    expected = -(-b.n_tiles // 8)
    assert embeddings_problem(b, first.encoder_id) == f"1 of {expected} chunk files missing"
    again = embed(root, "random-cnn", FAST, chunk_rows=8)
    assert [r.status for r in again.outcomes] == ["skipped", "complete"]
    assert np.array_equal(read_embeddings(b, first.encoder_id).features, want)
    assert embeddings_problem(b, first.encoder_id) is None


def test_a_slide_another_job_writes_is_busy_and_the_batch_goes_on(
    synth_root: Path, tmp_path: Path
) -> None:
    root = _copy(synth_root, tmp_path / "root")
    a, b = open_store(root).slide_ids
    eid = create_encoder("random-cnn").encoder_id
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_EMBEDDINGS, str(root), a, eid],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        argv = ["embed", str(root), "--encoder", "random-cnn", "--device", "cpu", "--quiet"]
        code, out, err = run_cli(argv)
        assert code == 1 and "1 embedded, 0 already complete, 1 busy" in out
        [line] = err.strip().splitlines()
        assert f"embeddings/{eid} is being written by pid {holder.pid} on {host_name()}" in line
        assert line.endswith("and re-run (command line: --wait)"), line  # embed's flag
        assert embedding_ids(open_store(root).slide(a)) == []
        assert embedding_ids(open_store(root).slide(b)) == [eid]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    code, out, _ = run_cli(argv)
    assert code == 0 and "1 embedded, 1 already complete, 0 busy" in out


def test_a_damaged_store_is_reported_and_the_others_embedded(
    synth_root: Path, tmp_path: Path
) -> None:
    root = _copy(synth_root, tmp_path / "root")
    a, b = open_store(root).slide_ids
    third = root / "slides" / "0123456789abcdef.zarr"
    shutil.copytree(root / "slides" / f"{a}.zarr", third)
    meta = root / "slides" / f"{b}.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:50])  # truncated metadata
    archive = open_store(root)
    assert archive.slide_ids == sorted([a, third.stem])
    [damage] = archive.damaged
    assert isinstance(damage, StoreCorruptError) and f"{b}.zarr" in str(damage)
    code, out, err = run_cli(
        ["embed", str(root), "--encoder", "random-cnn", "--device", "cpu", "--quiet"]
    )
    assert code == 1 and "2 embedded" in out
    [line] = err.strip().splitlines()
    assert line.startswith("wsi-ssl: error: ") and f"{b}.zarr: slide store is damaged" in line
    assert all(embedding_ids(open_store(root).slide(s)) for s in (a, third.stem))


def test_a_cuda_precision_on_the_cpu_is_refused(small_archive: Path, tmp_path: Path) -> None:
    """``--precision bf16`` on the CPU ran in fp32 under another encoder id: a duplicate of
    the fp32 vectors after which every command asked which encoder. Refused, nothing written."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    before = sorted(p.name for p in (root / "slides").glob("*.zarr/embeddings/*"))
    argv = ["embed", str(root), "--encoder", "random-cnn", "--device", "cpu", "--quiet"]
    code, out, err = run_cli([*argv, "--precision", "bf16"])
    assert code == 2 and out == "" and "--precision bf16 is a CUDA setting" in err, err
    assert sorted(p.name for p in (root / "slides").glob("*.zarr/embeddings/*")) == before
    assert run_cli([*argv, "--precision", "fp32"])[0] == 0  # what the CPU runs anyway
