"""Mesh export on analytic fields: geometry, orientation, texture, files, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from scipy.ndimage import distance_transform_edt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nerf import mesh as M  # noqa: E402

SPHERE_R = 0.6
CUBE_HALF = 0.5


def sphere_density(p: torch.Tensor) -> torch.Tensor:
    # Linear in the radius and equal to 10 (the default threshold) on the surface.
    return (10.0 + 100.0 * (SPHERE_R - p.norm(dim=-1))).clamp(min=0)


def position_albedo(p: torch.Tensor) -> torch.Tensor:
    return (p + 1) / 2


def cube_density(p: torch.Tensor) -> torch.Tensor:
    # Planar faces are linear in the lattice, so marching cubes places them exactly.
    return (10.0 + 100.0 * (CUBE_HALF - p.abs().max(dim=-1).values)).clamp(min=0)


RED, BLUE = (0.9, 0.1, 0.1), (0.1, 0.2, 0.9)


def cube_albedo(p: torch.Tensor) -> torch.Tensor:
    red, blue = p.new_tensor(RED), p.new_tensor(BLUE)
    return torch.where((p[:, :1] < 0), red, blue)


def texture_of(m: trimesh.Trimesh) -> np.ndarray:
    mat = m.visual.material
    img = getattr(mat, "image", None) or getattr(mat, "baseColorTexture", None)
    assert img is not None, "mesh has no texture"
    return np.asarray(img.convert("RGB"))


def sample(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest texel at OBJ-convention uv (v up), as floats in [0, 1]."""
    t = tex.shape[0]
    col = np.clip(np.floor(uv[:, 0] * t), 0, t - 1).astype(int)
    row = np.clip(np.floor((1 - uv[:, 1]) * t), 0, t - 1).astype(int)
    return tex[row, col, :3] / 255.0


# --------------------------------------------------------------------------------------------
# Threshold rule and empty fields
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mean", "expected"),
    [(2.5, 2.5), (25.0, 10.0), (0.0, 10.0), (-3.0, 10.0), (float("nan"), 10.0),
     (float("inf"), 10.0), (None, 10.0)],
)  # fmt: skip
def test_choose_threshold(mean, expected):
    assert M.choose_threshold(10.0, mean) == expected


def test_empty_field_raises_one_clear_line(tmp_path):
    with pytest.raises(M.EmptyMeshError) as err:
        M.export_mesh(
            lambda p: torch.full((len(p),), 0.5),
            position_albedo,
            tmp_path,
            resolution=16,
            progress=False,
        )
    msg = str(err.value)
    assert "\n" not in msg
    assert "0.5" in msg and "10" in msg and "--density_thresh" in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_nan_density_counts_as_empty():
    with pytest.raises(M.EmptyMeshError, match="largest density .* is 0"):
        M.extract_mesh(lambda p: torch.full((len(p),), float("nan")), resolution=8, threshold=1.0)


def test_nan_pockets_do_not_break_extraction():
    def field(p):
        d = sphere_density(p)
        return torch.where(p[:, 0] > 0.9, torch.full_like(d, float("nan")), d)

    v, f = M.extract_mesh(field, resolution=48, threshold=10.0)
    assert np.isfinite(v).all()
    assert trimesh.Trimesh(v, f, process=False).is_watertight


# --------------------------------------------------------------------------------------------
# Geometry stages
# --------------------------------------------------------------------------------------------


def test_marching_cubes_faces_point_outward():
    v, f = M.extract_mesh(sphere_density, resolution=40, threshold=10.0)
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight
    assert m.volume > 0
    assert (np.einsum("ij,ij->i", m.face_normals, m.triangles_center) > 0).all()


def test_surface_cut_by_the_box_is_closed():
    v, f = M.extract_mesh(lambda p: torch.full((len(p),), 100.0), resolution=8, threshold=10.0)
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight
    assert np.abs(v).max() <= 1.0
    assert abs(m.volume - 8.0) < 1e-4  # capped flat on the faces of [-1, 1]^3


def test_clean_drops_small_floaters_and_keeps_them_on_request():
    x = np.linspace(-1, 1, 48, dtype=np.float32)
    p = np.stack(np.meshgrid(x, x, x, indexing="ij"), -1)
    main = 0.5 - np.linalg.norm(p, axis=-1)
    floater = 0.08 - np.linalg.norm(p - np.array([0.8, 0.8, 0.8]), axis=-1)
    v, f = M.marching_cubes(np.maximum(main, floater), 0.0)
    v2, f2 = M.clean_mesh(v, f, min_component_frac=0.05)
    assert np.linalg.norm(v2, axis=1).max() < 0.6  # the floater at distance 1.39 is gone
    assert trimesh.Trimesh(v2, f2, process=False).is_watertight
    v3, _ = M.clean_mesh(v, f, min_component_frac=0.0)
    assert np.linalg.norm(v3, axis=1).max() > 1.2


def test_clean_merges_duplicates_and_removes_degenerate_faces():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    f = np.array([[0, 1, 2], [3, 1, 2], [2, 1, 0], [0, 0, 1]])
    v2, f2 = M.clean_mesh(v, f)
    assert len(v2) == 3 and len(f2) == 1


def test_decimate_reaches_target_and_keeps_shape():
    v, f = M.extract_mesh(sphere_density, resolution=64, threshold=10.0)
    v2, f2 = M.decimate_mesh(v, f, 2000)
    assert len(f2) <= 2000
    m = trimesh.Trimesh(v2, f2, process=False)
    assert m.is_watertight
    assert abs(m.volume / (4 / 3 * np.pi * SPHERE_R**3) - 1) < 0.02
    same_v, same_f = M.decimate_mesh(v2, f2, 10**6)
    assert len(same_f) == len(f2)


def test_unwrap_keeps_faces_and_positions():
    v, f = M.decimate_mesh(*M.extract_mesh(sphere_density, resolution=32, threshold=10.0), 800)
    v2, f2, uv = M.unwrap_uv(v, f)
    assert len(v2) == len(uv) >= len(v)
    assert np.array_equal(v2[f2], v[f])  # seam copies sit exactly on their originals
    assert uv.min() >= 0 and uv.max() <= 1


# --------------------------------------------------------------------------------------------
# Rasterizer and bake
# --------------------------------------------------------------------------------------------


def test_rasterizer_half_texture_by_hand():
    t = 8
    uv = np.array([[0, 0], [1, 0], [0, 1]], np.float32)  # lower-left half (v up)
    face_id, bary = M.rasterize_uv(uv, np.array([[0, 1, 2]]), t)
    rows, cols = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    u, v = (cols + 0.5) / t, 1 - (rows + 0.5) / t
    inside = u + v <= 1 + 1e-9  # centres on the diagonal count as covered
    assert int(inside.sum()) == 36  # 8 + 7 + ... + 1
    assert np.array_equal(face_id.numpy() == 0, inside)
    assert (face_id.numpy()[~inside] == -1).all()
    expected = np.stack([1 - u - v, u, v], -1)
    np.testing.assert_allclose(bary.numpy()[inside], expected[inside], atol=1e-6)
    assert (bary.numpy()[~inside] == 0).all()
    # Row 0 is the top of the image: its only covered texel is the left-most one.
    assert face_id[0].tolist() == [0] + [-1] * 7


def test_rasterizer_square_has_no_gaps_and_batches_agree():
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]])  # second face clockwise in the image: still filled
    face_id, bary = M.rasterize_uv(uv, f, 16)
    assert (face_id >= 0).all()
    diag = torch.arange(16)
    # The edge u == v runs from the bottom-left to the top-right texel (row 0 is the top).
    assert (face_id[15 - diag, diag] == 1).all()  # a tie goes to the larger face id
    assert (face_id[16 - diag[1:], diag[1:]] == 0).all()  # just below it: face 0 (lower right)
    np.testing.assert_allclose(bary.sum(-1).numpy(), 1.0, atol=1e-6)
    small_id, small_bary = M.rasterize_uv(torch.as_tensor(uv), torch.as_tensor(f), 16,
                                          batch_texels=7)  # fmt: skip
    assert torch.equal(small_id, face_id) and torch.allclose(small_bary, bary)


def test_margin_gives_slivers_their_texels():
    uv = np.array([[0.1, 0.1], [0.9, 0.1], [0.5, 0.102]], np.float32)  # 0.13 texel high
    exact, _ = M.rasterize_uv(uv, [[0, 1, 2]], 64)
    loose, bary = M.rasterize_uv(uv, [[0, 1, 2]], 64, margin=1.0)
    hit = loose >= 0
    assert (exact >= 0).sum() < hit.sum()
    assert hit[exact >= 0].all()  # a superset of the exact hits
    rows = torch.nonzero(hit)[:, 0].unique().tolist()
    assert rows == [56, 57, 58]  # the sliver sits at pixel y = 57.5
    assert (bary[hit] >= 0).all()  # clamped onto the triangle
    torch.testing.assert_close(bary[hit].sum(-1), torch.ones(int(hit.sum())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rasterizer_on_cuda_matches_cpu():
    v, f = M.decimate_mesh(*M.extract_mesh(sphere_density, resolution=32, threshold=10.0), 800)
    _, f2, uv = M.unwrap_uv(v, f, texture_size=256)
    cpu_id, cpu_bary = M.rasterize_uv(uv, f2, 256)
    gpu_id, gpu_bary = M.rasterize_uv(torch.as_tensor(uv).cuda(), torch.as_tensor(f2).cuda(), 256)
    assert gpu_id.is_cuda
    assert (gpu_id.cpu() != cpu_id).float().mean() < 1e-3
    same = gpu_id.cpu() == cpu_id
    assert torch.allclose(gpu_bary.cpu()[same], cpu_bary[same], atol=1e-4)


@pytest.fixture(scope="module")
def small_atlas():
    v, f = M.decimate_mesh(*M.extract_mesh(sphere_density, resolution=40, threshold=10.0), 1500)
    return M.unwrap_uv(v, f, texture_size=256)


def test_dilation_fills_a_ring_around_charts(small_atlas):
    v, f, uv = small_atlas
    t, colour = 256, (0.2, 0.6, 0.9)

    def albedo(p):
        return p.new_tensor(colour).expand(len(p), 3)

    face_id, _ = M.rasterize_uv(uv, f, t, margin=1.0)  # what the bake covers
    covered = face_id.numpy() >= 0
    dist = distance_transform_edt(~covered)
    want = np.round(np.array(colour) * 255).astype(np.uint8)
    tex = M.bake_texture(v, f, uv, albedo, t, dilate=3, margin=1.0)
    filled = (tex == want).all(-1)
    assert filled[dist <= 3].all()  # includes every 8-neighbour of a chart texel
    assert not filled[dist > 3].any()  # the background further out stays black
    assert (dist > 3).any()
    full = M.bake_texture(v, f, uv, albedo, t)  # default: fill everything
    assert (full == want).all()


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sphere_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("sphere")
    paths = M.export_mesh(
        sphere_density,
        position_albedo,
        out,
        resolution=80,
        decimate_target=6000,
        texture_size=512,
        formats=("obj", "glb", "ply"),
        progress=False,
    )
    return out, paths


def test_sphere_files_and_no_temporaries(sphere_export):
    out, paths = sphere_export
    names = sorted(p.name for p in out.iterdir())
    assert names == ["albedo.png", "mesh.glb", "mesh.mtl", "mesh.obj", "mesh.ply"]
    assert {k: p.name for k, p in paths.items()} == {
        "obj": "mesh.obj",
        "mtl": "mesh.mtl",
        "texture": "albedo.png",
        "glb": "mesh.glb",
        "ply": "mesh.ply",
    }
    assert "map_Kd albedo.png" in (out / "mesh.mtl").read_text()


def test_sphere_geometry(sphere_export):
    out, _ = sphere_export
    m = trimesh.load(out / "mesh.ply", process=False)
    assert len(m.faces) <= 6000
    assert m.is_watertight
    assert m.volume > 0  # outward
    assert abs(m.volume / (4 / 3 * np.pi * SPHERE_R**3) - 1) < 0.02
    np.testing.assert_allclose(np.linalg.norm(m.vertices, axis=1), SPHERE_R, atol=0.01)
    # Vertex colours follow the albedo.
    np.testing.assert_allclose(m.visual.vertex_colors[:, :3] / 255, (m.vertices + 1) / 2, atol=0.01)


@pytest.mark.parametrize("name", ["mesh.obj", "mesh.glb"])
def test_sphere_texture_matches_albedo_at_every_vertex(sphere_export, name):
    out, _ = sphere_export
    m = trimesh.load(out / name, force="mesh", process=False)
    tex = texture_of(m)
    assert tex.shape[:2] == (512, 512)
    assert len(m.faces) <= 6000
    np.testing.assert_allclose(np.linalg.norm(m.vertices, axis=1), SPHERE_R, atol=0.01)
    err = np.abs(sample(tex, m.visual.uv) - (m.vertices + 1) / 2).max(axis=1)
    # A vertex is at most about a texel (~0.006 units here) from the texel centre sampled.
    assert np.median(err) < 0.01
    assert err.max() < 0.02


def test_cube_two_colours(tmp_path):
    paths = M.export_mesh(
        cube_density,
        cube_albedo,
        tmp_path,
        resolution=64,
        decimate_target=3000,
        texture_size=256,
        formats=("obj", "ply"),
        progress=False,
    )
    assert set(paths) == {"obj", "mtl", "texture", "ply"}
    solid = trimesh.load(paths["ply"], process=False)
    assert solid.is_watertight
    assert abs(solid.volume / (2 * CUBE_HALF) ** 3 - 1) < 0.02
    m = trimesh.load(paths["obj"], force="mesh", process=False)
    colours = sample(texture_of(m), m.visual.uv)
    left, right = m.vertices[:, 0] < -0.1, m.vertices[:, 0] > 0.1
    assert left.sum() > 20 and right.sum() > 20
    assert np.abs(colours[left] - RED).max() < 0.02
    assert np.abs(colours[right] - BLUE).max() < 0.02
    # A known point: the centre of the -x face is red.
    i = np.argmin(np.linalg.norm(m.vertices - [-CUBE_HALF, 0, 0], axis=1))
    assert np.linalg.norm(m.vertices[i] - [-CUBE_HALF, 0, 0]) < 0.1
    np.testing.assert_allclose(colours[i], RED, atol=0.02)


def test_bad_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        M.export_mesh(sphere_density, position_albedo, tmp_path, formats=("stl",), progress=False)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(M.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        M.write_ply(tmp_path / "mesh.ply", v, [[0, 1, 2]], np.ones((3, 3)))
    assert list(tmp_path.iterdir()) == []
