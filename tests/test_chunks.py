"""Ray chunks: exactly the cell's rays, each once, shuffled across images; reuse, mismatch and killed writes;
the stream visits every ray once per epoch and resumes exactly."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mega_nerf.data.chunks import MANIFEST, gather_in_memory, prepare_chunks
from mega_nerf.data.dataset import load_dataset, write_coordinates, write_image
from mega_nerf.data.stream import RayStream
from mega_nerf.errors import UserError
from mega_nerf.partition.maskfile import write_mask

W, H = 20, 10


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path]:
    """12 random images (3 val) and one cell's masks covering a random ~60% of each image."""
    root = tmp_path_factory.mktemp("chunks")
    data, masks = root / "data", root / "masks" / "0"
    masks.mkdir(parents=True)
    write_coordinates(data, torch.zeros(3), 10.0)
    rng = np.random.default_rng(0)
    for i in range(12):
        c2w = torch.cat([torch.eye(3), torch.tensor([[0.0], [0.1 * i], [0.0]])], 1)
        write_image(data, "val" if i % 4 == 3 else "train", f"img{i:02d}",
                    rng.integers(0, 256, (H, W, 3), dtype=np.uint8), [20, 20, W / 2, H / 2], c2w)
        write_mask(masks / f"img{i:02d}.mask", torch.from_numpy(rng.random((H, W)) < 0.6))
    return data, masks


def expected_rays(data: Path, masks: Path) -> set[tuple[int, int, tuple[int, ...]]]:
    from mega_nerf.partition.maskfile import load_mask
    rays = set()
    for m in load_dataset(data).images:
        mask = load_mask(masks, m.name, H, W).clone()
        if m.split == "val":
            mask[:, W // 2:] = False
        rgb = m.load_rgb().view(-1, 3)
        for p in mask.flatten().nonzero()[:, 0].tolist():
            rays.add((m.index, p, tuple(rgb[p].tolist())))
    return rays


def read_chunks(path: Path) -> np.ndarray:
    manifest = json.loads((path / MANIFEST).read_text())
    return np.concatenate([np.load(path / name) for _, name, _ in manifest["chunks"]])


def test_chunks_hold_each_masked_ray_once_shuffled(scene, tmp_path):
    data, masks = scene
    manifest = prepare_chunks(load_dataset(data), masks, [tmp_path / "a", tmp_path / "b"], chunk_rays=300,
                              progress=False)
    assert len(manifest.chunks) > 2 and {d for d, _, _ in manifest.chunks} == {0, 1}
    rays = np.concatenate([np.load([tmp_path / "a", tmp_path / "b"][d] / n) for d, n, _ in manifest.chunks])
    got = [(int(r["image"]), int(r["pixel"]), tuple(int(c) for c in r["rgb"])) for r in rays]
    assert len(got) == len(set(got)) == manifest.count  # each once
    assert set(got) == expected_rays(data, masks)  # exactly the cell's rays (val: left half)
    assert rays.dtype.itemsize <= 12
    for _, name, count in manifest.chunks:  # every chunk mixes many images
        images = np.load((tmp_path / "a" if (tmp_path / "a" / name).exists() else tmp_path / "b") / name)["image"]
        assert len(np.unique(images)) >= 10
        assert np.bincount(images).max() < 0.25 * count


def test_chunks_are_reused_and_mismatches_refused(scene, tmp_path):
    data, masks = scene
    dataset = load_dataset(data)
    first = prepare_chunks(dataset, masks, [tmp_path / "c"], chunk_rays=500, progress=False)
    stamp = (tmp_path / "c" / first.chunks[0][1]).stat().st_mtime_ns
    again = prepare_chunks(dataset, masks, [tmp_path / "c"], chunk_rays=500, progress=False)
    assert again == first and (tmp_path / "c" / first.chunks[0][1]).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="another masks"):
        prepare_chunks(dataset, None, [tmp_path / "c"], chunk_rays=500, progress=False)
    with pytest.raises(UserError, match="another scale factor|another dataset"):
        prepare_chunks(load_dataset(data, scale_factor=2), None, [tmp_path / "c"], chunk_rays=500, progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not ray chunks"):
        prepare_chunks(dataset, masks, [tmp_path / "d"], chunk_rays=500, progress=False)


def test_killed_write_is_redone(scene, tmp_path):
    data, masks = scene
    out = tmp_path / "e"
    out.mkdir()
    (out / "chunk_00000.npy.bucket").write_bytes(b"half")  # what a killed scatter leaves: no manifest
    (out / "chunk_00001.npy.tmp").write_bytes(b"half")
    manifest = prepare_chunks(load_dataset(data), masks, [out], chunk_rays=400, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [n for _, n, _ in manifest.chunks])
    assert len(read_chunks(out)) == manifest.count


@pytest.mark.parametrize("piece_rays", [1 << 22, 90])  # whole chunks; pieces of chunks
def test_stream_visits_every_ray_once_per_epoch_and_resumes(scene, tmp_path, piece_rays):
    data, masks = scene
    manifest = prepare_chunks(load_dataset(data), masks, [tmp_path], chunk_rays=250, progress=False)
    sources = [tmp_path / n for _, n, _ in manifest.chunks]
    counts = [c for _, _, c in manifest.chunks]
    stream = RayStream(sources, counts, batch_size=64, seed=3, device=torch.device("cpu"), piece_rays=piece_rays)
    assert len(stream.pieces) > len(counts) or piece_rays > max(counts)
    seen = []
    while stream.epoch == 0:
        image, pixel, rgb = stream.next_batch()
        seen += list(zip(image.tolist(), pixel.tolist()))
        if stream.offset >= manifest.count:
            break
    assert len(seen) == len(set(seen)) == manifest.count
    state = stream.state_dict()
    after = [stream.next_batch() for _ in range(5)]
    resumed = RayStream(sources, counts, batch_size=64, seed=3, device=torch.device("cpu"), piece_rays=piece_rays)
    resumed.load_state_dict(state)
    for a, b in zip(after, [resumed.next_batch() for _ in range(5)]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_memory_mode_holds_the_same_rays(scene, tmp_path):
    data, masks = scene
    dataset = load_dataset(data)
    manifest = prepare_chunks(dataset, masks, [tmp_path], chunk_rays=10_000, progress=False)
    memory = gather_in_memory(dataset, masks)
    assert len(memory) == manifest.count
    assert set(zip(memory["image"].tolist(), memory["pixel"].tolist())) == set(
        zip(read_chunks(tmp_path)["image"].tolist(), read_chunks(tmp_path)["pixel"].tolist()))
