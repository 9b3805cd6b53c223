"""Ray chunks: every ray of the cell exactly once with its colour, shuffled across images; keys in few bits;
reuse, mismatch, old formats, full disks and killed writes; the stream visits every ray once per epoch and
resumes exactly."""
import json
import math
import os
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import OTHER_HOST, dead_pid

import mega_nerf.data.chunks as chunks
from mega_nerf.data.chunks import MANIFEST, ChunkReader, default_store_dir, gather_in_memory, prepare_chunks
from mega_nerf.data.dataset import load_dataset, write_coordinates, write_image
from mega_nerf.data.keys import decode_keys, encode_keys
from mega_nerf.data.store import store_path
from mega_nerf.data.stream import RayStream, memory_pieces
from mega_nerf.errors import UserError
from mega_nerf.io import FOREIGN_TEMP_SECONDS, HOST
from mega_nerf.partition.maskfile import load_mask, write_mask

W, H = 20, 10


def make_dataset(root: Path, shift: float = 0.0) -> None:
    """12 random images (3 val); `shift` moves every camera (another dataset of the same names and sizes)."""
    write_coordinates(root, torch.zeros(3), 10.0)
    rng = np.random.default_rng(0)
    for i in range(12):
        c2w = torch.cat([torch.eye(3), torch.tensor([[shift], [0.1 * i], [0.0]])], 1)
        write_image(root, "val" if i % 4 == 3 else "train", f"img{i:02d}",
                    rng.integers(0, 256, (H, W, 3), dtype=np.uint8), [20, 20, W / 2, H / 2], c2w)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path]:
    """The dataset and one cell's masks covering a random ~60% of each image."""
    root = tmp_path_factory.mktemp("chunks")
    data, masks = root / "data", root / "masks" / "0"
    masks.mkdir(parents=True)
    make_dataset(data)
    rng = np.random.default_rng(1)
    for i in range(12):
        write_mask(masks / f"img{i:02d}.mask", torch.from_numpy(rng.random((H, W)) < 0.6))
    return data, masks


def expected_rays(data: Path, masks: Path) -> list[tuple[int, int, tuple[int, ...]]]:
    """The cell's rays (image, pixel, rgb) by a slow loop over the masks (val images: left half only)."""
    rays = []
    for m in load_dataset(data).images:
        mask = load_mask(masks, m.name, H, W).clone()
        if m.split == "val":
            mask[:, W // 2:] = False
        rgb = m.load_rgb().view(-1, 3)
        rays += [(m.index, p, tuple(rgb[p].tolist())) for p in mask.flatten().nonzero()[:, 0].tolist()]
    return rays


def as_tuples(rays: dict[str, np.ndarray]) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(int(i), int(p), tuple(int(c) for c in rgb))
            for i, p, rgb in zip(rays["image"], rays["pixel"], rays["rgb"], strict=True)]


def read_all(manifest, paths: list[Path], data: Path, store: Path | None = None) -> list[tuple]:
    reader = ChunkReader(manifest, paths, load_dataset(data), store)
    return [ray for c in range(len(reader.counts)) for ray in as_tuples(reader(c))]


def test_chunks_hold_each_masked_ray_once_shuffled(scene, tmp_path, capsys):
    data, masks = scene
    paths = [tmp_path / "a", tmp_path / "b"]
    manifest = prepare_chunks(load_dataset(data), masks, paths, chunk_rays=300)
    out = capsys.readouterr().out
    assert f"{manifest.count:,} rays" in out and str(tmp_path / "image_store") in out  # bytes and where, first
    assert len(manifest.chunks) > 2 and {d for d, _, _ in manifest.chunks} == {0, 1}
    got = read_all(manifest, paths, data)
    assert sorted(got) == sorted(expected_rays(data, masks))  # a permutation of the cell's rays
    for c in range(len(manifest.chunks)):  # every chunk mixes many images
        images = ChunkReader(manifest, paths, load_dataset(data))(c)["image"]
        assert len(np.unique(images)) >= 10
        assert np.bincount(images).max() < 0.25 * len(images)
    assert sorted(p.name for p in (tmp_path / "image_store").iterdir()) == [manifest.store]
    assert (tmp_path / "image_store" / manifest.store).stat().st_size == 12 * H * W * 3


def test_chunks_written_in_groups_under_a_small_key_budget_are_the_same_bytes(scene, tmp_path, monkeypatch):
    """A cell with more keys than KEY_BUDGET re-reads its masks for each group of chunks that fits the budget (the
    first pass keeps no keys): the chunks are byte for byte those of one pass over cached keys."""
    data, masks = scene
    dataset = load_dataset(data)
    whole = prepare_chunks(dataset, masks, [tmp_path / "whole"], chunk_rays=100)
    monkeypatch.setattr(chunks, "KEY_BUDGET", 250)  # 2 chunks of about 100 keys a group, of 8 or so chunks
    calls = []
    reads = chunks.training_mask
    monkeypatch.setattr(chunks, "training_mask", lambda *a: calls.append(a) or reads(*a))
    grouped = prepare_chunks(dataset, masks, [tmp_path / "grouped"], chunk_rays=100)
    assert len(whole.chunks) >= 6 and grouped.chunks == whole.chunks
    assert len(calls) == 12 * (1 + math.ceil(len(whole.chunks) / 2))  # a counting pass, then one per group
    for _, name, _ in whole.chunks:
        assert (tmp_path / "grouped" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_cell_over_the_key_budget_is_written_without_holding_its_keys(tmp_path, monkeypatch):
    """Above KEY_BUDGET no pass holds the cell's keys: the counting pass drops them once they pass it (it used to
    keep all of them first), and each group's buckets hold about KEY_BUDGET. 64 images of 10,000 masked pixels on one
    thread: 5.1 MB of int64 keys; numpy's allocations are what tracemalloc sees."""
    import tracemalloc

    import mega_nerf.data.store as store
    write_coordinates(tmp_path / "data", torch.zeros(3), 10.0)
    (tmp_path / "masks").mkdir()
    for i in range(64):
        write_image(tmp_path / "data", "val" if i == 63 else "train", f"img{i:02d}", np.zeros((100, 100, 3), np.uint8),
                    [50, 50, 50, 50],
                    torch.cat([torch.eye(3), torch.tensor([[0.0], [0.1 * i], [0.0]])], 1))
        write_mask(tmp_path / "masks" / f"img{i:02d}.mask", torch.ones(100, 100, dtype=torch.bool))
    dataset = load_dataset(tmp_path / "data")
    monkeypatch.setattr(store, "workers", lambda: 1)
    monkeypatch.setattr(chunks, "KEY_BUDGET", 20_000)
    tracemalloc.start()
    try:
        manifest = prepare_chunks(dataset, tmp_path / "masks", [tmp_path / "c"], chunk_rays=10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest.count == 635_000 and len(manifest.chunks) == 64  # the val image's left half only
    assert peak < 0.4 * manifest.count * 8  # the keys alone are 5.1 MB


def test_keys_round_trip_in_few_bits():
    """Elias-Fano: sorted keys come back exactly, in at most 2 + log2(universe / count) bits a key (+ header)."""
    rng = np.random.default_rng(2)
    for universe, count in ((1, 1), (1000, 0), (1000, 1000), (30_000_000, 3_000_000), (2 ** 40, 5000)):
        keys = np.sort(rng.choice(universe, count, replace=False)) if universe < 2 ** 31 else \
            np.unique(rng.integers(0, universe, count))
        data = encode_keys(keys, universe)
        assert np.array_equal(decode_keys(data), keys)
        assert len(data) <= 34 + count * (2 + math.log2(universe / max(count, 1))) / 8
    with pytest.raises(ValueError):
        decode_keys(encode_keys(np.arange(10), 100)[:-1])


def test_chunks_are_reused_and_mismatches_refused(scene, tmp_path):
    data, masks = scene
    dataset = load_dataset(data)
    first = prepare_chunks(dataset, masks, [tmp_path / "c"], chunk_rays=500)
    stamp = (tmp_path / "c" / first.chunks[0][1]).stat().st_mtime_ns
    again = prepare_chunks(dataset, masks, [tmp_path / "c"], chunk_rays=500)
    assert again == first and (tmp_path / "c" / first.chunks[0][1]).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="another masks"):
        prepare_chunks(dataset, None, [tmp_path / "c"], chunk_rays=500)
    with pytest.raises(UserError, match="another protocol \\(made under --eval_protocol mega-nerf; resuming"):
        prepare_chunks(dataset, masks, [tmp_path / "c"], chunk_rays=500, protocol="strict")
    with pytest.raises(UserError, match="another scale factor|another dataset"):
        prepare_chunks(load_dataset(data, scale_factor=2), None, [tmp_path / "c"], chunk_rays=500)
    make_dataset(tmp_path / "moved", shift=0.5)  # same names and sizes, other poses
    with pytest.raises(UserError, match=r"c: holds chunks of another dataset"):
        prepare_chunks(load_dataset(tmp_path / "moved"), masks, [tmp_path / "c"], chunk_rays=500)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not ray chunks"):
        prepare_chunks(dataset, masks, [tmp_path / "d"], chunk_rays=500)


def test_old_format_is_refused_saying_what_to_delete(scene, tmp_path):
    data, masks = scene
    old = tmp_path / "old"
    old.mkdir()
    np.save(old / "chunk_00000.npy", np.zeros(3, [("image", "<u2"), ("pixel", "<u4"), ("rgb", "u1", 3)]))
    (old / MANIFEST).write_text(json.dumps({"version": 1, "chunks": [[0, "chunk_00000.npy", 3]]}))
    with pytest.raises(UserError, match=rf"{old}: holds ray chunks of an older format .*delete"):
        prepare_chunks(load_dataset(data), masks, [old], chunk_rays=500)


def test_a_full_disk_is_refused_before_writing(scene, tmp_path):
    data, masks = scene
    with mock.patch.object(chunks.shutil, "disk_usage", return_value=mock.Mock(free=100)), \
            pytest.raises(UserError, match=r"the ray chunks need [\d,]+ bytes but its disk has 100 free"):
        prepare_chunks(load_dataset(data), masks, [tmp_path / "full"], chunk_rays=500)
    assert not list((tmp_path / "full").glob("chunk_*"))


def test_killed_write_resumes(scene, tmp_path, capsys):
    """A write killed after its first chunk keeps that chunk on the rerun, which writes the rest; leftovers of a
    killed run (temp files) go, in the shared image store's folder too where this host's process has ended."""
    data, masks = scene
    out = tmp_path / "e"
    real, calls = chunks._write_chunk, []

    def dies_after_one(*job):
        calls.append(job[0].name)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as a kill would stop it
        return real(*job)
    with mock.patch.object(chunks, "_write_chunk", dies_after_one), mock.patch.object(chunks, "ordered_map",
                                                                                      lambda f, xs: map(f, xs)):
        with pytest.raises(KeyboardInterrupt):
            prepare_chunks(load_dataset(data), masks, [out], chunk_rays=400)
    assert not (out / MANIFEST).exists()
    kept = out / calls[0]
    stamp = kept.stat().st_mtime_ns
    (out / "chunk_00003.keys.77.tmp").write_bytes(b"half")
    store = store_path(default_store_dir([out]), load_dataset(data))
    dead = dead_pid()
    killed_store, elsewhere = (store.with_name(f"{store.name}.{dead}-{host}.tmp") for host in (HOST, OTHER_HOST))
    for leftover in (killed_store, elsewhere):
        leftover.write_bytes(b"half a store")
    hour_ago = time.time() - FOREIGN_TEMP_SECONDS - 60
    os.utime(elsewhere, (hour_ago, hour_ago))
    capsys.readouterr()
    manifest = prepare_chunks(load_dataset(data), masks, [out], chunk_rays=400)
    assert not killed_store.exists() and elsewhere.exists()  # another host's process may still be writing
    assert f"holds 1 temp file(s) of runs on other hosts or containers, untouched for over 1 h (12 bytes; e.g. " \
           f"{elsewhere.name})" in capsys.readouterr().err
    assert kept.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [n for _, n, _ in manifest.chunks])
    assert sorted(read_all(manifest, [out], data)) == sorted(expected_rays(data, masks))
    prepare_chunks(load_dataset(data), masks, [tmp_path / "f"], chunk_rays=400)
    assert [(p.name, p.read_bytes()) for p in sorted(out.glob("chunk_*"))] == \
        [(p.name, p.read_bytes()) for p in sorted((tmp_path / "f").glob("chunk_*"))]


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_stream_visits_every_ray_once_per_epoch_and_resumes(scene, tmp_path, mode):
    data, masks = scene
    dataset = load_dataset(data)
    if mode == "disk":
        manifest = prepare_chunks(dataset, masks, [tmp_path], chunk_rays=250)
        read = ChunkReader(manifest, [tmp_path], dataset)
        counts = read.counts
    else:
        read, counts = memory_pieces(gather_in_memory(dataset, masks), piece_rays=90)
    assert len(counts) > 2
    total = sum(counts)
    stream = RayStream(read, counts, batch_size=64, seed=3, device=torch.device("cpu"))
    seen = []
    while stream.offset < total:
        image, pixel, rgb = stream.next_batch()
        seen += list(zip(image.tolist(), pixel.tolist(), (rgb * 255).round().int().tolist()))
    assert sorted((i, p, tuple(c)) for i, p, c in seen) == sorted(expected_rays(data, masks))
    state = stream.state_dict()
    after = [stream.next_batch() for _ in range(5)]
    resumed = RayStream(read, counts, batch_size=64, seed=3, device=torch.device("cpu"))
    resumed.load_state_dict(state)
    for a, b in zip(after, [resumed.next_batch() for _ in range(5)]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_batches_are_the_definitions_sequence_sliced() -> None:
    """Batch b of an epoch is rays [b B, (b + 1) B) of the epoch's pieces in their seeded order, each permuted by
    the seed (seed, epoch, piece); an epoch's last batch is partial. Built here from that definition alone and
    compared over two and a half epochs."""
    rng = np.random.default_rng(0)
    counts = [70, 130, 45]
    pieces = [{"image": rng.integers(0, 9, n).astype(np.int32), "pixel": rng.integers(0, 999, n).astype(np.int32),
               "rgb": rng.integers(0, 256, (n, 3)).astype(np.uint8)} for n in counts]
    batch, seed = 64, 5
    expected = []
    for epoch in range(3):
        sequence = []
        for k in np.random.default_rng([seed, epoch]).permutation(len(counts)):
            order = np.random.default_rng([seed, epoch, k]).permutation(counts[k])
            sequence += [(int(pieces[k]["image"][i]), int(pieces[k]["pixel"][i]), tuple(pieces[k]["rgb"][i]))
                         for i in order]
        expected += [sequence[b:b + batch] for b in range(0, len(sequence), batch)]
    stream = RayStream(lambda k: pieces[k], counts, batch_size=batch, seed=seed, device=torch.device("cpu"))
    for want in expected[:10]:
        image, pixel, rgb = stream.next_batch()
        got = list(zip(image.tolist(), pixel.tolist(), map(tuple, (rgb * 255).round().int().tolist())))
        assert got == want


def test_memory_mode_holds_the_same_rays(scene):
    data, masks = scene
    assert sorted(as_tuples(gather_in_memory(load_dataset(data), masks))) == sorted(expected_rays(data, masks))


def test_chunks_written_to_two_folders_read_with_one_are_one_line(scene, tmp_path):
    data, masks = scene
    dataset = load_dataset(data)
    prepare_chunks(dataset, masks, [tmp_path / "a", tmp_path / "b"], chunk_rays=300)
    with pytest.raises(UserError, match=r"a/manifest.json: chunk \S+ lies in chunk folder 1, but --chunk_paths "
                                        r"gives 1; give the folders the chunks were written to, in the same order"):
        prepare_chunks(dataset, masks, [tmp_path / "a"], chunk_rays=300)
