"""RAS <-> ITK (LPS) transform conversion, checked against hand-computed matrices and against ANTs itself."""
from __future__ import annotations

import numpy as np
import pytest

from atlasgs_bids.errors import InputError
from atlasgs_bids.imaging.transforms import (
    itk_to_ras,
    ras_to_itk,
    read_itk_affine,
    read_target2t1w,
    rotation_angle_deg,
    write_itk_affine,
)

# Known answers, worked by hand. Each row: RAS map (3x3, t), the same map in LPS (3x3, t).
# Rz(+90) sends RAS +x (Right) to +y (Anterior); it commutes with diag(-1,-1,1), so only t changes sign in x, y.
# Rx(+90) sends +y to +z; in LPS the y axis is flipped, so the off-diagonal signs flip.
KNOWN = [
    (
        [[0, -1, 0], [1, 0, 0], [0, 0, 1]], [10.0, 20.0, 30.0],
        [[0, -1, 0], [1, 0, 0], [0, 0, 1]], [-10.0, -20.0, 30.0],
    ),
    (
        [[1, 0, 0], [0, 0, -1], [0, 1, 0]], [1.0, -2.0, 3.0],
        [[1, 0, 0], [0, 0, 1], [0, -1, 0]], [-1.0, 2.0, 3.0],
    ),
    (
        [[0, 0, 1], [0, 1, 0], [-1, 0, 0]], [0.0, 0.0, -5.0],
        [[0, 0, -1], [0, 1, 0], [1, 0, 0]], [0.0, 0.0, -5.0],
    ),
]


def _affine(r, t) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = t
    return m


def _random_rigid(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    r = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])
    return _affine(r, rng.uniform(-50, 50, size=3))


@pytest.mark.parametrize("r_ras, t_ras, r_lps, t_lps", KNOWN)
def test_known_rotations(r_ras, t_ras, r_lps, t_lps):
    ras = _affine(r_ras, t_ras)
    lps = _affine(r_lps, t_lps)
    np.testing.assert_allclose(ras_to_itk(ras), lps, atol=1e-12)
    np.testing.assert_allclose(itk_to_ras(lps), ras, atol=1e-12)


def test_rz90_file_parameters(tmp_path):
    """The exact Parameters line for Rz(90) + (10, 20, 30) mm RAS, worked by hand."""
    path = write_itk_affine(tmp_path / "xfm.txt", _affine(*KNOWN[0][:2]))
    lines = path.read_text().splitlines()
    assert lines[0] == "#Insight Transform File V1.0"
    assert lines[2] == "Transform: AffineTransform_double_3_3"
    params = np.array([float(v) for v in lines[3].split(":")[1].split()])
    np.testing.assert_allclose(params, [0, -1, 0, 1, 0, 0, 0, 0, 1, -10, -20, 30], atol=1e-12)
    assert lines[4].split(":")[1].split() == ["0", "0", "0"]
    assert [p.name for p in tmp_path.iterdir()] == ["xfm.txt"]  # no temp file left behind


def test_round_trip_write_read(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        m = _random_rigid(rng)
        np.testing.assert_allclose(read_itk_affine(write_itk_affine(tmp_path / f"x{i}.txt", m)), m, atol=1e-12)


def test_ants_agrees_on_points(tmp_path):
    """ANTs applies our file to an LPS point exactly as the RAS matrix does to the same physical point."""
    ants = pytest.importorskip("ants")
    m = _affine(*KNOWN[0][:2])
    path = write_itk_affine(tmp_path / "xfm.txt", m)
    tx = ants.read_transform(str(path), precision="double")
    p_ras = np.array([12.0, -7.0, 33.0])
    flip = np.array([-1.0, -1.0, 1.0])
    got_lps = np.asarray(tx.apply_to_point(tuple(flip * p_ras)))
    np.testing.assert_allclose(flip * got_lps, m[:3, :3] @ p_ras + m[:3, 3], atol=1e-9)
    # by hand: Rz90 (12, -7, 33) = (7, 12, 33); + (10, 20, 30) = (17, 32, 63) RAS
    np.testing.assert_allclose(flip * got_lps, [17.0, 32.0, 63.0], atol=1e-9)


def test_reads_ants_mat_with_centre(tmp_path):
    """A binary .mat written by antspyx, with a non-zero centre, reads back as the right RAS map."""
    ants = pytest.importorskip("ants")
    rng = np.random.default_rng(1)
    m_lps = ras_to_itk(_random_rigid(rng))
    centre = np.array([5.0, -20.0, 12.0])
    tx = ants.create_ants_transform(
        transform_type="AffineTransform", precision="float", dimension=3,
        matrix=m_lps[:3, :3], translation=m_lps[:3, 3] - centre + m_lps[:3, :3] @ centre, center=centre,
    )
    path = tmp_path / "0GenericAffine.mat"
    ants.write_transform(tx, str(path))
    np.testing.assert_allclose(read_itk_affine(path), itk_to_ras(m_lps), atol=1e-4)  # float32 storage


def test_reads_text_with_centre(tmp_path):
    """Text files with a non-zero centre (as ITK writes them) use y = M (x - c) + c + t."""
    path = tmp_path / "c.txt"
    path.write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: MatrixOffsetTransformBase_double_3_3\n"
        "Parameters: 0 -1 0 1 0 0 0 0 1 0 0 0\nFixedParameters: 10 0 0\n"
    )
    lps = np.eye(4)
    lps[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    lps[:3, 3] = [10, -10, 0]  # c - M c = (10, 0, 0) - (0, 10, 0)
    np.testing.assert_allclose(read_itk_affine(path), itk_to_ras(lps), atol=1e-12)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_itk_affine(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="shape"):
        ras_to_itk(np.eye(3))
    bad = tmp_path / "two.txt"
    bad.write_text("#Insight Transform File V1.0\nTransform: A\nParameters: 1\nTransform: B\nParameters: 1\n")
    with pytest.raises(InputError, match="exactly one"):
        read_itk_affine(bad)


def test_rotation_angle():
    assert rotation_angle_deg(_affine(*KNOWN[0][:2])) == pytest.approx(90.0)
    assert rotation_angle_deg(np.eye(3)) == pytest.approx(0.0)


def test_read_target2t1w_inverts_the_files_pull_map(tmp_path):
    """A ``from-T2w_to-T1w_mode-image`` file holds T1w -> target (it resamples the target onto the T1w); the
    forward model needs target -> T1w: a T1w point sent to the target comes back."""
    t1w2target = np.array([[0.0, -1.0, 0.0, 5.0], [1.0, 0.0, 0.0, -3.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 1.0]])
    path = write_itk_affine(tmp_path / "from-T2w_to-T1w_mode-image_xfm.txt", t1w2target)
    p_t1w = np.array([10.0, -20.0, 30.0, 1.0])
    np.testing.assert_allclose(read_target2t1w(path) @ (t1w2target @ p_t1w), p_t1w, atol=1e-9)
