"""Depth encodings: HHA geometry on ray-cast rooms of known shape, its uint8 scaling, and log depth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fcn.depth import NYUD_KINECT, NYUD_MEAN_LOG_DEPTH_MM, Camera, hha, hha_channels, log_depth

# A wide 160x120 camera, so the floor fills a quarter of a level view.
CAMERA = Camera(fx=80.0, fy=80.0, cx=79.5, cy=59.5)
SHAPE = (120, 160)
CAMERA_HEIGHT_M = 1.5
WALL_DISTANCE_M = 4.0
Channels = tuple[np.ndarray, np.ndarray, np.ndarray]
# Rows this close to the floor/wall edge have normals fitted across both planes.
EDGE_MARGIN = 4


@dataclass
class Room:
    """Depth of a floor and a facing wall, with the truth: which pixels see floor, and their height."""

    depth: np.ndarray
    is_floor: np.ndarray
    height_m: np.ndarray

    def interior(self, floor: bool) -> np.ndarray:
        """Pixels of the floor (or wall) at least ``EDGE_MARGIN`` rows from the edge between them."""
        edge_row = int(np.argmax(self.is_floor.any(axis=1)))
        rows = np.arange(self.depth.shape[0])[:, None]
        away = rows >= edge_row + EDGE_MARGIN if floor else rows < edge_row - EDGE_MARGIN
        return away & (self.is_floor == floor)


def render_room(
    pitch_deg: float = 0.0,
    camera: Camera = CAMERA,
    shape: tuple[int, int] = SHAPE,
    camera_height_m: float = CAMERA_HEIGHT_M,
    wall_distance_m: float = WALL_DISTANCE_M,
) -> Room:
    """Ray-cast a floor ``camera_height_m`` below the camera and a wall ``wall_distance_m`` ahead.

    The camera is pitched down by ``pitch_deg``; in its frame (x right, y down, z forward) world-up
    is ``(0, -cos, -sin)`` and the horizontal forward direction ``(0, -sin, cos)``.
    """
    pitch = np.radians(pitch_deg)
    up = np.array([0.0, -np.cos(pitch), -np.sin(pitch)])
    forward = np.array([0.0, -np.sin(pitch), np.cos(pitch)])
    rows, cols = np.indices(shape, dtype=np.float64)
    rays = np.stack([(cols - camera.cx) / camera.fx, (rows - camera.cy) / camera.fy, np.ones(shape)], axis=-1)
    with np.errstate(divide="ignore"):
        to_floor = np.where(rays @ up < 0, -camera_height_m / (rays @ up), np.inf)
        to_wall = np.where(rays @ forward > 0, wall_distance_m / (rays @ forward), np.inf)
    depth = np.minimum(to_floor, to_wall)  # rays have z = 1, so the ray parameter is the z-depth
    height_m = (rays * depth[..., None]) @ up + camera_height_m
    return Room(depth, to_floor < to_wall, height_m)


@pytest.fixture(scope="module")
def level_room() -> Room:
    return render_room()


@pytest.fixture(scope="module")
def level_channels(level_room: Room) -> Channels:
    return hha_channels(level_room.depth, CAMERA)


def test_floor_is_height_zero_and_wall_height_grows_upwards(level_room: Room, level_channels: Channels) -> None:
    _, height_m, _ = level_channels
    assert np.abs(height_m[level_room.is_floor]).max() < 0.05
    wall = ~level_room.is_floor
    assert np.abs(height_m[wall] - level_room.height_m[wall]).max() < 0.03
    wall_column = height_m[level_room.interior(floor=False)[:, 80], 80]
    assert np.all(np.diff(wall_column) < 0)  # higher up the image, higher up the wall
    assert wall_column[0] > 2.0


def test_floor_faces_up_and_wall_is_vertical(level_room: Room, level_channels: Channels) -> None:
    _, _, angle_deg = level_channels
    assert np.abs(angle_deg[level_room.interior(floor=True)]).max() < 2.0
    assert np.abs(angle_deg[level_room.interior(floor=False)] - 90.0).max() < 2.0


def test_disparity_is_inverse_depth(level_room: Room, level_channels: Channels) -> None:
    disparity, _, _ = level_channels
    np.testing.assert_allclose(disparity * level_room.depth, 1.0)


@pytest.mark.parametrize("pitch_deg", [15.0, -10.0])
def test_gravity_is_estimated_for_a_tilted_camera(pitch_deg: float) -> None:
    room = render_room(pitch_deg)
    _, height_m, angle_deg = hha_channels(room.depth, CAMERA)
    assert np.abs(height_m[room.is_floor]).max() < 0.05
    assert np.abs(height_m - room.height_m).max() < 0.05
    assert np.abs(angle_deg[room.interior(floor=True)]).max() < 2.0
    assert np.abs(angle_deg[room.interior(floor=False)] - 90.0).max() < 2.0


def test_without_floor_in_view_the_floor_is_assumed_1_3_m_below_the_camera() -> None:
    # A wall 1 m ahead: the lowest point is 0.76 m below the camera, too high to be the floor.
    depth = np.ones(SHAPE)
    _, height_m, angle_deg = hha_channels(depth, CAMERA)
    rows = np.arange(SHAPE[0])[:, None]
    np.testing.assert_allclose(height_m, np.broadcast_to(1.3 - (rows - CAMERA.cy) / CAMERA.fy, SHAPE), atol=1e-9)
    np.testing.assert_allclose(angle_deg, 90.0, atol=1e-6)


@pytest.mark.parametrize("missing", [0.0, np.nan, np.inf])
def test_missing_depth_is_zero_in_hha_and_nan_in_the_channels(level_room: Room, missing: float) -> None:
    depth = level_room.depth.copy()
    depth[40:60, 50:90] = missing
    hole = np.zeros(SHAPE, dtype=bool)
    hole[40:60, 50:90] = True
    encoded = hha(depth, CAMERA)
    assert np.all(encoded[hole] == 0)
    assert np.all(encoded[~hole].any(axis=-1))
    for channel in hha_channels(depth, CAMERA):
        assert np.isnan(channel[hole]).all()
        assert np.isfinite(channel[~hole]).all()


def test_all_missing_depth_gives_an_all_zero_image() -> None:
    assert not hha(np.zeros(SHAPE), CAMERA).any()


def test_uint8_scaling_follows_the_documented_formulas(level_room: Room, level_channels: Channels) -> None:
    disparity, height_m, angle_deg = level_channels
    encoded = hha(level_room.depth, CAMERA)
    assert encoded.shape == (*SHAPE, 3)
    assert encoded.dtype == np.uint8
    for row, col in [(0, 0), (30, 80), (59, 100), (100, 20), (119, 159)]:
        expected = [310.0 * disparity[row, col], 100.0 * height_m[row, col], angle_deg[row, col] + 38.0]
        assert encoded[row, col].tolist() == [min(255, int(np.floor(value + 0.5))) for value in expected]
    # A wall pixel at 4 m: disparity 310/4 = 77.5 rounds up to 78; a vertical surface reads 128.
    wall_pixel = level_room.interior(floor=False)
    assert np.all(encoded[wall_pixel][:, 0] == 78)
    assert np.all(np.abs(encoded[wall_pixel][:, 2].astype(int) - 128) <= 2)
    # The floor reads about 0 cm and 38 (0 degrees + 38); it is closer than 4 m, so more disparity.
    floor_pixel = level_room.interior(floor=True)
    assert np.all(encoded[floor_pixel][:, 1] <= 5)
    assert np.all(np.abs(encoded[floor_pixel][:, 2].astype(int) - 38) <= 2)
    assert np.all(encoded[floor_pixel][:, 0] > 78)


def test_near_depth_and_high_points_saturate_at_255() -> None:
    # 310 / 1 m = 310 > 255 (the reference's 31000 / 100 cm).
    assert np.all(hha(np.ones(SHAPE), CAMERA)[..., 0] == 255)
    room = render_room(camera_height_m=2.4)
    height_cm = hha(room.depth, CAMERA)[..., 1]
    above_255_cm = room.height_m > 2.56
    assert above_255_cm.any()
    assert np.all(height_cm[above_255_cm] == 255)
    assert np.all(height_cm[room.height_m < 2.5] < 255)


def test_full_resolution_nyud_frame() -> None:
    room = render_room(15.0, NYUD_KINECT, (480, 640))
    _, height_m, _ = hha_channels(room.depth)
    assert np.abs(height_m - room.height_m).max() < 0.05


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (np.ones((4, 4, 1)), "2-D"),
        (np.ones(16), "2-D"),
        (np.full((4, 4), -1.0), "negative"),
    ],
)
def test_bad_depth_is_refused(depth: np.ndarray, message: str) -> None:
    for encode in (hha, hha_channels, log_depth):
        with pytest.raises(ValueError, match=message):
            encode(depth)


def test_camera_parse() -> None:
    assert Camera.parse("518.857901, 519.469611,325.582449,253.736166") == NYUD_KINECT
    assert Camera.parse("80,80,79.5,59.5") == CAMERA


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80,80,79.5", "4 comma-separated numbers"),
        ("80,80,79.5,59.5,1", "4 comma-separated numbers"),
        ("80,eighty,79.5,59.5", "fy is not a number: 'eighty'"),
        ("0,80,79.5,59.5", "focal lengths must be positive"),
        ("80,-80,79.5,59.5", "focal lengths must be positive"),
        ("80,80,nan,59.5", "cx must be a finite number"),
    ],
)
def test_camera_parse_refuses_bad_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Camera.parse(text)


def test_log_depth_is_the_reference_centred_log_of_millimetres() -> None:
    depth = np.array([[1.0, 2.0], [np.exp(NYUD_MEAN_LOG_DEPTH_MM) / 1000.0, 0.0]])
    encoded = log_depth(depth)
    assert encoded.dtype == np.float32
    assert encoded[0, 0] == pytest.approx(np.log(1000.0) - 7.844, abs=1e-5)
    assert encoded[0, 1] - encoded[0, 0] == pytest.approx(np.log(2.0), abs=1e-5)  # ratios become differences
    assert encoded[1, 0] == pytest.approx(0.0, abs=1e-5)  # the dataset-mean depth (2.55 m) reads 0
    assert encoded[1, 1] == 0.0  # missing depth reads as the mean


def test_log_depth_of_a_room_is_finite_and_centred_near_zero(level_room: Room) -> None:
    depth = level_room.depth.copy()
    depth[:10] = 0.0
    encoded = log_depth(depth)
    assert np.isfinite(encoded).all()
    assert np.all(encoded[:10] == 0.0)
    assert abs(float(encoded[10:].mean())) < 0.5  # a 1.5-4 m room is near NYUDv2's mean depth
