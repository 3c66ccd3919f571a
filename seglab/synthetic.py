"""Synthetic indoor scenes in the exact on-disk format of Stanford 2D-3D-S.

The real data set is 110 GB; this generator writes a small tree with the same layout, the
same file names and the same 24-bit label encoding, so that every script, test and demo of
the project runs without it:

    python -m seglab.synthetic --out data/synthetic --images-per-area 24 --size 256

Each room is a box with walls, floor and ceiling, furnished with doors, windows, boards,
bookcases, columns, beams, tables, chairs, sofas and clutter. A pinhole camera looks at it
from a few places, several frames per room as in the real data. Every object gets a random
color and its own texture, and lighting and noise change per frame, so color alone does not
give the class away: a model has to learn shape and context. A few patches of the semantic
images are #0D0D0D ("no data"), as in the real scans.

Each frame also gets its depth (area_N/data/depth/..._domain_depth.png) from the same geometry,
in the real format: 16-bit, 1/512 m, z-depth along the camera's axis, 65535 where a scanner
has no reading: on window glass, beyond MAX_RANGE and in the "no data" patches.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import AREAS, LABELS_FILE, DataError, Frame
from seglab import cli

ROOM_TYPES = ("office", "office", "office", "hallway", "conferenceRoom", "storage", "WC", "lounge")
NO_DATA_COLOR = (13, 13, 13)  # #0D0D0D, index 855,309: past the end of the label list
# Written beside the label list: the root was made here, and may be written into again.
MARKER_FILE = Path("assets") / "made_by_synthetic.txt"
NEAR_PLANE = 0.05  # meters in front of the camera; closer geometry is clipped
DEPTH_UNITS_PER_METER = 512  # the real depth PNGs count 1/512 m
NO_DEPTH = 65535  # their value where there is no reading
MAX_RANGE = 6.5  # meters; farther surfaces have no depth reading, as in the real scans


@dataclass
class Face:
    """A planar quad of the scene: corners `(4, 3)` in meters, counter-clockwise seen from
    the side its `normal` points to; `label` is its entry of semantic_labels.json."""

    corners: np.ndarray
    normal: np.ndarray
    label: str
    texture: str
    color: np.ndarray
    second_color: np.ndarray
    spacing: float = 0.5


@dataclass
class Room:
    """A furnished room: faces to draw in order (room shell first, then far-to-near objects
    are sorted per frame), plus its size for placing cameras."""

    room_type: str
    room_num: int
    size: np.ndarray  # (width x, height y, depth z) in meters
    shell: list[Face] = field(default_factory=list)
    objects: list[list[Face]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# Geometry


def box_faces(low: np.ndarray, high: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The six faces of an axis-aligned box as `(corners (4, 3), outward normal (3,))`."""
    x0, y0, z0 = low
    x1, y1, z1 = high
    quads = [
        ([[x0, y0, z0], [x0, y0, z1], [x0, y1, z1], [x0, y1, z0]], [-1, 0, 0]),
        ([[x1, y0, z1], [x1, y0, z0], [x1, y1, z0], [x1, y1, z1]], [1, 0, 0]),
        ([[x0, y0, z0], [x1, y0, z0], [x1, y0, z1], [x0, y0, z1]], [0, -1, 0]),
        ([[x0, y1, z1], [x1, y1, z1], [x1, y1, z0], [x0, y1, z0]], [0, 1, 0]),
        ([[x1, y0, z0], [x0, y0, z0], [x0, y1, z0], [x1, y1, z0]], [0, 0, -1]),
        ([[x0, y0, z1], [x1, y0, z1], [x1, y1, z1], [x0, y1, z1]], [0, 0, 1]),
    ]
    return [(np.array(c, dtype=np.float64), np.array(n, dtype=np.float64)) for c, n in quads]


def rotation(yaw: float, pitch: float) -> np.ndarray:
    """World-to-camera rotation `(3, 3)`: camera looks along +z, y up, yaw about y first."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    yaw_matrix = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    pitch_matrix = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return pitch_matrix @ yaw_matrix


def clip_near(points: np.ndarray) -> np.ndarray:
    """Clip a polygon `(N, 3)` in camera coordinates to z >= NEAR_PLANE (Sutherland-Hodgman)."""
    kept = []
    for i in range(len(points)):
        current, following = points[i], points[(i + 1) % len(points)]
        current_in, following_in = current[2] >= NEAR_PLANE, following[2] >= NEAR_PLANE
        if current_in:
            kept.append(current)
        if current_in != following_in:
            t = (NEAR_PLANE - current[2]) / (following[2] - current[2])
            kept.append(current + t * (following - current))
    return np.array(kept).reshape(-1, 3)


# ----------------------------------------------------------------------------------------
# Room layout


# A typical color per class (RGB in [0, 1]): real walls tend to be light, floors darker,
# chairs dark... Each object mixes its class color with a random one, and columns look like
# walls and beams like ceilings, so color is a hint but never the answer.
TYPICAL_COLORS = {
    "wall": (0.80, 0.78, 0.72),
    "ceiling": (0.90, 0.90, 0.88),
    "floor": (0.45, 0.40, 0.35),
    "door": (0.55, 0.35, 0.20),
    "window": (0.35, 0.35, 0.40),
    "board": (0.90, 0.92, 0.90),
    "bookcase": (0.50, 0.35, 0.20),
    "column": (0.80, 0.78, 0.72),
    "beam": (0.90, 0.90, 0.88),
    "table": (0.60, 0.45, 0.30),
    "chair": (0.20, 0.20, 0.25),
    "sofa": (0.40, 0.20, 0.20),
}


def random_color(rng: np.random.Generator) -> np.ndarray:
    """A color from one distribution shared by all classes, `(3,)` float in [0, 1]."""
    hue = rng.uniform(0, 1)
    saturation = rng.uniform(0.0, 0.6)
    value = rng.uniform(0.35, 0.95)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1)


def object_color(rng: np.random.Generator, class_name: str) -> np.ndarray:
    """The color of one object: its class's typical color mixed with a random one."""
    typical = TYPICAL_COLORS.get(class_name)
    if typical is None:
        return random_color(rng)
    randomness = rng.uniform(0.2, 0.7)
    return (1 - randomness) * np.array(typical) + randomness * random_color(rng)


class RoomBuilder:
    """Collects the faces of one room and numbers object instances per class and area."""

    def __init__(self, rng: np.random.Generator, area_num: str, counters: dict[str, int]):
        self.rng = rng
        self.area_num = area_num
        self.counters = counters
        self.room: Room | None = None

    def label(self, class_name: str) -> str:
        self.counters[class_name] = self.counters.get(class_name, 0) + 1
        room = self.room
        instance = self.counters[class_name]
        return f"{class_name}_{instance}_{room.room_type}_{room.room_num}_{self.area_num}"

    def material(self, class_name: str, texture: str, spacing: float = 0.5) -> dict:
        return {
            "texture": texture,
            "color": object_color(self.rng, class_name),
            "second_color": random_color(self.rng),
            "spacing": spacing,
        }

    def add_box(self, class_name: str, low, high, texture: str = "plain", front=None) -> None:
        """A box object; `front=(normal, texture)` gives one face its own texture."""
        label = self.label(class_name)
        material = self.material(class_name, texture)
        faces = []
        for corners, normal in box_faces(np.asarray(low, float), np.asarray(high, float)):
            face_material = dict(material)
            if front is not None and np.allclose(normal, front[0]):
                face_material["texture"] = front[1]
            faces.append(Face(corners, normal, label, **face_material))
        self.room.objects.append(faces)

    def add_boxes(self, class_name: str, boxes: list[tuple], texture: str = "plain") -> None:
        """One object made of several boxes (a table and its legs) sharing label and color."""
        label = self.label(class_name)
        material = self.material(class_name, texture)
        faces = []
        for low, high in boxes:
            for corners, normal in box_faces(np.asarray(low, float), np.asarray(high, float)):
                faces.append(Face(corners, normal, label, **material))
        self.room.objects.append(faces)


def wall_frame(wall: int, size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Wall `wall` (0 far, 1 left, 2 right, 3 near) as origin, along-wall unit vector, inward
    normal and length: a point on it is `origin + u * along + y * up`."""
    width, _, depth = size
    if wall == 0:
        return np.array([0, 0, depth]), np.array([1.0, 0, 0]), np.array([0, 0, -1.0]), width
    if wall == 1:
        return np.array([0, 0, 0.0]), np.array([0, 0, 1.0]), np.array([1.0, 0, 0]), depth
    if wall == 2:
        return np.array([width, 0, depth]), np.array([0, 0, -1.0]), np.array([-1.0, 0, 0]), depth
    return np.array([width, 0, 0.0]), np.array([-1.0, 0, 0]), np.array([0, 0, 1.0]), width


def build_room(builder: RoomBuilder, room_type: str, room_num: int, furnish_all: bool) -> Room:
    """Lay out one room. With `furnish_all`, every class is placed at least once."""
    rng = builder.rng
    size = np.array([rng.uniform(4, 8), rng.uniform(2.7, 3.3), rng.uniform(5, 9)])
    room = Room(room_type, room_num, size)
    builder.room = room
    # Each step draws from the same generator, in this order: the same seed, the same room.
    add_shell(builder)
    add_wall_items(builder, furnish_all)
    add_bookcases_columns_beams(builder, furnish_all)
    add_tables_and_chairs(builder)
    add_sofa_and_floor_clutter(builder, furnish_all)
    return room


def add_shell(builder: RoomBuilder) -> None:
    """The four walls, the floor and the ceiling of `builder.room`."""
    rng, room = builder.rng, builder.room
    width, height, depth = room.size
    up = np.array([0, 1.0, 0])
    wall_material = builder.material("wall", "plain")
    floor_texture = "planks" if rng.random() < 0.5 else "grid"
    for wall in range(4):
        origin, along, normal, length = wall_frame(wall, room.size)
        corners = np.array(
            [
                origin,
                origin + length * along,
                origin + length * along + height * up,
                origin + height * up,
            ]
        )
        room.shell.append(Face(corners, normal, builder.label("wall"), **wall_material))
    floor = np.array([[0, 0, 0], [0, 0, depth], [width, 0, depth], [width, 0, 0.0]])
    room.shell.append(
        Face(floor, up, builder.label("floor"), **builder.material("floor", floor_texture))
    )
    ceiling = floor[::-1] + height * up
    ceiling_face = Face(
        ceiling, -up, builder.label("ceiling"), **builder.material("ceiling", "grid", 0.6)
    )
    room.shell.append(ceiling_face)


def add_wall_items(builder: RoomBuilder, furnish_all: bool) -> None:
    """Doors, windows, boards and clutter flat on the walls, none overlapping another."""
    rng, room = builder.rng, builder.room
    width, height, depth = room.size
    up = np.array([0, 1.0, 0])
    # Flat things on the walls, kept apart by remembering what each wall already holds.
    occupied: dict[int, list[tuple[float, float]]] = {wall: [] for wall in range(4)}

    def place_on_wall(class_name: str, width_range, bottom, item_height, texture) -> bool:
        for _ in range(20):
            wall = int(rng.choice([0, 0, 1, 2, 3]))
            origin, along, normal, length = wall_frame(wall, room.size)
            item_width = rng.uniform(*width_range)
            if item_width > length - 0.4:
                continue
            start = rng.uniform(0.2, length - item_width - 0.2)
            if any(
                start < end + 0.1 and start + item_width > begin - 0.1
                for begin, end in occupied[wall]
            ):
                continue
            occupied[wall].append((start, start + item_width))
            base = origin + 0.01 * normal + start * along + bottom * up
            corners = np.array(
                [
                    base,
                    base + item_width * along,
                    base + item_width * along + item_height * up,
                    base + item_height * up,
                ]
            )
            label = builder.label(class_name)
            room.objects.append(
                [Face(corners, normal, label, **builder.material(class_name, texture, 0.08))]
            )
            return True
        return False

    for _ in range(rng.integers(2, 5)):
        place_on_wall("door", (1.0, 1.8), 0.0, rng.uniform(2.0, 2.3), "frame")
    for _ in range(rng.integers(0 if not furnish_all else 1, 3)):
        place_on_wall("window", (1.0, 2.5), rng.uniform(0.9, 1.1), rng.uniform(1.0, 1.5), "window")
    if furnish_all or rng.random() < 0.5:
        place_on_wall("board", (2.0, 3.5), rng.uniform(0.8, 1.0), rng.uniform(1.1, 1.4), "frame")
    for _ in range(rng.integers(0, 3)):
        place_on_wall("clutter", (0.4, 1.2), rng.uniform(1.0, 1.5), rng.uniform(0.4, 0.9), "blots")


def add_bookcases_columns_beams(builder: RoomBuilder, furnish_all: bool) -> None:
    """Bookcases against the walls, columns at the sides, beams under the ceiling."""
    rng, room = builder.rng, builder.room
    width, height, depth = room.size
    up = np.array([0, 1.0, 0])
    # Bookcases stand against a wall, their front face showing shelves and books.
    for _ in range(rng.integers(1 if furnish_all else 0, 3)):
        wall = int(rng.choice([0, 1, 2]))
        origin, along, normal, length = wall_frame(wall, room.size)
        case_width, case_depth = rng.uniform(0.8, 2.0), rng.uniform(0.3, 0.45)
        start = rng.uniform(0.1, length - case_width - 0.1)
        a = origin + start * along
        b = a + case_width * along + case_depth * normal + rng.uniform(1.8, 2.2) * up
        builder.add_box("bookcase", np.minimum(a, b), np.maximum(a, b), front=(normal, "shelves"))

    if furnish_all or rng.random() < 0.5:
        for _ in range(rng.integers(1, 3)):
            side = rng.uniform(0.4, 0.6)
            x = float(rng.choice([0.0, width - side]))
            z = rng.uniform(1.0, depth - side)
            builder.add_box("column", [x, 0, z], [x + side, height, z + side])
    if furnish_all or rng.random() < 0.3:
        for _ in range(rng.integers(1, 3)):
            z, beam_width, drop = (
                rng.uniform(0.5, 0.9) * depth,
                rng.uniform(0.2, 0.4),
                rng.uniform(0.2, 0.4),
            )
            builder.add_box("beam", [0, height - drop, z], [width, height, z + beam_width])


def add_tables_and_chairs(builder: RoomBuilder) -> None:
    """Tables in the middle of the room, clutter on top and chairs around."""
    rng, room = builder.rng, builder.room
    width, height, depth = room.size
    for _ in range(rng.integers(1, 3)):
        table_width, table_depth = rng.uniform(1.2, 2.4), rng.uniform(0.7, 1.2)
        x = rng.uniform(0.8, max(0.9, width - table_width - 0.8))
        z = rng.uniform(1.5, max(1.6, depth - table_depth - 0.8))
        top = rng.uniform(0.72, 0.76)
        leg = 0.05
        boxes = [([x, top - 0.04, z], [x + table_width, top, z + table_depth])]
        for lx, lz in [
            (x, z),
            (x + table_width - leg, z),
            (x, z + table_depth - leg),
            (x + table_width - leg, z + table_depth - leg),
        ]:
            boxes.append(([lx, 0, lz], [lx + leg, top - 0.04, lz + leg]))
        builder.add_boxes("table", boxes)
        for _ in range(rng.integers(0, 4)):
            cx = rng.uniform(x, x + table_width - 0.3)
            cz = rng.uniform(z, z + table_depth - 0.3)
            item = rng.uniform(0.1, 0.35, size=3)
            builder.add_box(
                "clutter",
                [cx, top, cz],
                [cx + item[0], top + item[1], cz + item[2]],
                texture="blots",
            )
        for _ in range(rng.integers(1, 4)):
            side = rng.choice([-1, 1])
            cx = rng.uniform(x, x + table_width - 0.45)
            cz = z - 0.55 if side < 0 else z + table_depth + 0.1
            seat = 0.45
            back_z = (cz, cz + 0.05) if side < 0 else (cz + seat - 0.05, cz + seat)
            boxes = [
                ([cx, 0.42, cz], [cx + seat, 0.47, cz + seat]),
                ([cx, 0.47, back_z[0]], [cx + seat, 0.95, back_z[1]]),
            ]
            for lx, lz in [
                (cx, cz),
                (cx + seat - 0.04, cz),
                (cx, cz + seat - 0.04),
                (cx + seat - 0.04, cz + seat - 0.04),
            ]:
                boxes.append(([lx, 0, lz], [lx + 0.04, 0.42, lz + 0.04]))
            builder.add_boxes("chair", boxes)


def add_sofa_and_floor_clutter(builder: RoomBuilder, furnish_all: bool) -> None:
    """Now and then a sofa against a wall; clutter on the floor along the walls."""
    rng, room = builder.rng, builder.room
    width, height, depth = room.size
    up = np.array([0, 1.0, 0])
    if furnish_all or rng.random() < 0.1:
        wall = int(rng.choice([1, 2]))
        origin, along, normal, length = wall_frame(wall, room.size)
        sofa_width = rng.uniform(1.4, 2.0)
        start = rng.uniform(0.5, length - sofa_width - 0.5)
        a = origin + start * along
        boxes = []
        for low_off, high_off in [
            ((0, 0, 0), (sofa_width, 0.42, 0.85)),
            ((0, 0.42, 0), (sofa_width, 0.85, 0.25)),
        ]:
            p = a + low_off[0] * along + low_off[1] * up + low_off[2] * normal
            q = a + high_off[0] * along + high_off[1] * up + high_off[2] * normal
            boxes.append((np.minimum(p, q), np.maximum(p, q)))
        builder.add_boxes("sofa", boxes, texture="fabric")

    # Clutter along the walls on the floor: boxes, bins, piles.
    for _ in range(rng.integers(4, 10)):
        item = rng.uniform([0.3, 0.3, 0.3], [0.9, 1.2, 0.8])
        x = float(rng.choice([0.05, width - item[0] - 0.05, rng.uniform(0.5, width - 1)]))
        z = rng.uniform(0.5, depth - item[2] - 0.05)
        builder.add_box("clutter", [x, 0, z], [x + item[0], item[1], z + item[2]], texture="blots")


# ----------------------------------------------------------------------------------------
# Rendering


def texture_value(
    face: Face, s: np.ndarray, t: np.ndarray, width: float, height: float, rng: np.random.Generator
) -> np.ndarray:
    """Colors `(N, 3)` of N points of a face at in-plane coordinates s, t (meters)."""
    base, second = face.color, face.second_color
    weight = np.zeros_like(s)
    if face.texture == "grid":
        lines = (np.abs((s / face.spacing) % 1 - 0.5) > 0.47) | (
            np.abs((t / face.spacing) % 1 - 0.5) > 0.47
        )
        weight = lines * 0.6
    elif face.texture == "planks":
        plank = np.floor(t / 0.18)
        weight = 0.25 * ((plank * 0.618) % 1) + 0.15 * np.sin(s * 7 + plank)
    elif face.texture == "frame":
        border = face.spacing
        inside = (s > border) & (s < width - border) & (t > border) & (t < height - border)
        weight = np.where(inside, 0.0, 1.0)
    elif face.texture == "window":
        sky = np.clip(0.9 + 0.1 * t / max(height, 1e-6), 0, 1)
        pane = window_glass(face, s, t, width, height)
        colors = np.where(pane[:, None], sky[:, None] * np.array([0.85, 0.92, 1.0]), second)
        return colors
    elif face.texture == "shelves":
        shelf = (t % 0.38) < 0.03
        book = np.floor(s / 0.045)
        book_shade = (book * 0.37 + np.floor(t / 0.38) * 0.51) % 1
        book_color = np.stack([book_shade, (book_shade * 3.1) % 1, (book_shade * 7.3) % 1], axis=1)
        return np.where(shelf[:, None], base, 0.3 + 0.6 * book_color)
    elif face.texture == "blots":
        weight = (
            np.sin(s * 13.0 + 2 * np.sin(t * 7.0)) * np.sin(t * 11.0 + 3 * np.sin(s * 5.0)) > 0.2
        ) * 0.8
    elif face.texture == "fabric":
        weight = 0.15 * (np.sin(s * 60) * np.sin(t * 60) > 0)
    return (1 - weight)[:, None] * base + weight[:, None] * second


def window_glass(
    face: Face, s: np.ndarray, t: np.ndarray, width: float, height: float
) -> np.ndarray:
    """Which of N points of a window face are glass, not its frame or mullions: `(N,)` bool."""
    border = face.spacing
    mullion = (np.abs(s - width / 2) < border / 2) | (np.abs(t - height / 2) < border / 2)
    edge = (s < border) | (s > width - border) | (t < border) | (t > height - border)
    return ~(mullion | edge)


def depth_png_values(z_depth: np.ndarray, no_reading: np.ndarray) -> np.ndarray:
    """z-depth in meters `(H, W)` float -> the values of a real depth PNG, `(H, W)` uint16:
    1/512 m, NO_DEPTH where `no_reading` (bool) or beyond MAX_RANGE."""
    values = np.clip(np.round(z_depth * DEPTH_UNITS_PER_METER), 0, NO_DEPTH - 1)
    missing = no_reading | (z_depth > MAX_RANGE)
    return np.where(missing, NO_DEPTH, values).astype(np.uint16)


def render(
    room: Room,
    label_index: dict[str, int],
    camera: np.ndarray,
    yaw: float,
    pitch: float,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame: `(size, size, 3)` uint8 RGB, `(size, size, 3)` uint8 semantic colors
    and `(size, size)` uint16 depth in the real format (see depth_png_values)."""
    world_to_camera = rotation(yaw, pitch)
    focal = size / 2 / math.tan(math.radians(rng.uniform(55, 75)) / 2)

    # Painter's algorithm: the room shell first, then objects from far to near.
    def distance(faces: list[Face]) -> float:
        return -float(np.linalg.norm(np.mean([f.corners.mean(0) for f in faces], axis=0) - camera))

    faces = list(room.shell)
    for obj in sorted(room.objects, key=distance):
        faces.extend(obj)

    face_ids = Image.new("I", (size, size), 0)
    draw = ImageDraw.Draw(face_ids)
    for number, face in enumerate(faces, start=1):
        if np.dot(face.normal, camera - face.corners[0]) <= 0:
            continue  # seen from behind
        points = clip_near((face.corners - camera) @ world_to_camera.T)
        if len(points) < 3:
            continue
        u = size / 2 + focal * points[:, 0] / points[:, 2]
        v = size / 2 - focal * points[:, 1] / points[:, 2]
        draw.polygon(list(zip(u.tolist(), v.tolist(), strict=True)), fill=number)
    ids = np.asarray(face_ids, dtype=np.int64)

    # Cast each pixel's ray on the plane of its face to get the point it shows.
    v_grid, u_grid = np.mgrid[0:size, 0:size] + 0.5
    rays = (
        np.stack(
            [(u_grid - size / 2) / focal, -(v_grid - size / 2) / focal, np.ones_like(u_grid)],
            axis=-1,
        )
        @ world_to_camera
    )  # camera -> world
    image = np.zeros((size, size, 3))
    # z-depth: a ray is (u, v, 1) in camera coordinates, so its length parameter is the depth.
    z_depth = np.zeros((size, size))
    glass = np.zeros((size, size), dtype=bool)
    light = np.array([rng.uniform(-0.5, 0.5), 1.0, rng.uniform(-0.5, 0.5)])
    light /= np.linalg.norm(light)
    for number in np.unique(ids):
        if number == 0:
            continue
        face = faces[number - 1]
        where = ids == number
        ray = rays[where]
        origin, edge_s, edge_t = (
            face.corners[0],
            face.corners[1] - face.corners[0],
            face.corners[3] - face.corners[0],
        )
        width, height = np.linalg.norm(edge_s), np.linalg.norm(edge_t)
        depth = np.dot(origin - camera, face.normal) / np.clip(ray @ face.normal, -1e9, -1e-9)
        points = camera + depth[:, None] * ray - origin
        s, t = points @ (edge_s / width), points @ (edge_t / height)
        z_depth[where] = depth
        if face.texture == "window":  # a scanner sees through glass, or not at all
            glass[where] = window_glass(face, s, t, width, height)
        colors = texture_value(face, s, t, width, height, rng)
        shade = 0.6 + 0.4 * max(0.0, float(np.dot(face.normal, light))) + 0.15 * face.normal[2]
        falloff = 1.0 / (1.0 + 0.01 * depth**2)
        image[where] = colors * (shade * (0.6 + 0.4 * falloff))[:, None]

    exposure = rng.uniform(0.75, 1.2) * rng.uniform(0.9, 1.1, size=3)
    image = image * exposure + rng.normal(0, 0.03, size=image.shape)
    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8)

    labels = np.array([0] + [label_index[face.label] for face in faces], dtype=np.int64)[ids]
    semantic = np.stack([(labels >> 16) & 255, (labels >> 8) & 255, labels & 255], axis=-1)
    semantic = semantic.astype(np.uint8)
    no_reading = glass | (ids == 0)
    for _ in range(rng.integers(0, 4)):  # holes in the scan: no label, no depth
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.02, 0.08, 2) * size
        hole = ((v_grid - cy) / ry) ** 2 + ((u_grid - cx) / rx) ** 2 < 1
        semantic[hole] = NO_DATA_COLOR
        no_reading |= hole
    return rgb, semantic, depth_png_values(z_depth, no_reading)


def camera_views(room: Room, num_frames: int, rng: np.random.Generator):
    """Camera positions and angles: a few cameras per room, a few frames per camera."""
    width, _, depth = room.size
    views = []
    while len(views) < num_frames:
        camera = np.array(
            [rng.uniform(0.35, 0.65) * width, rng.uniform(1.3, 1.7), rng.uniform(0.15, 0.3) * depth]
        )
        camera_id = "".join(f"{b:02x}" for b in rng.integers(0, 256, 16))
        for _ in range(min(3, num_frames - len(views))):
            yaw, pitch = math.radians(rng.uniform(-35, 35)), math.radians(rng.uniform(-12, 8))
            views.append((camera_id, camera, yaw, pitch))
    return views


def generate(
    out: str | Path,
    areas: list[str] | tuple[str, ...] = AREAS,
    images_per_area: int = 24,
    size: int = 1080,
    seed: int = 0,
    frames_per_room: int = 5,
    progress: bool = True,
) -> None:
    """Write a synthetic 2D-3D-S tree under `out` (assets/ and one area_* folder per area)."""
    out = Path(out)
    # First lay out every room, so that the label list can be sorted like the real one before
    # any pixel refers to it.
    layouts = []
    counters_per_area: dict[str, dict[str, int]] = {}
    for area in areas:
        rng = np.random.default_rng(
            [seed, AREAS.index(area) if area in AREAS else hash(area) % 1000]
        )
        area_num = area.rstrip("ab")  # labels of areas 5a and 5b both say "5"
        counters = counters_per_area.setdefault(area_num, {})
        builder = RoomBuilder(rng, area_num, counters)
        room_numbers: dict[str, int] = {}
        num_rooms = max(1, math.ceil(images_per_area / frames_per_room))
        for room_index in range(num_rooms):
            room_type = str(rng.choice(ROOM_TYPES))
            room_numbers[room_type] = room_numbers.get(room_type, 0) + 1
            room = build_room(
                builder, room_type, room_numbers[room_type], furnish_all=room_index == 0
            )
            count = images_per_area // num_rooms + (room_index < images_per_area % num_rooms)
            layouts.append((area, room, camera_views(room, count, rng), rng))

    labels = sorted(
        {
            face.label
            for _, room, _, _ in layouts
            for obj in [room.shell, *room.objects]
            for face in obj
        }
    )
    labels = ["<UNK>_0_<UNK>_0_0", *labels]
    refuse_foreign_root(out, labels)
    (out / LABELS_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out / LABELS_FILE).write_text(json.dumps(labels))
    (out / MARKER_FILE).write_text("synthetic scenes written by seglab/synthetic.py\n")
    label_index = {label: index for index, label in enumerate(labels)}

    from tqdm import tqdm

    total = sum(len(views) for _, _, views, _ in layouts)
    bar = tqdm(total=total, desc="synthetic frames", disable=not progress)
    for area, room, views, rng in layouts:
        for index, (camera_id, camera, yaw, pitch) in enumerate(views):
            rgb, semantic, depth = render(room, label_index, camera, yaw, pitch, size, rng)
            name = f"camera_{camera_id}_{room.room_type}_{room.room_num}_frame_{index}"
            frame = Frame.at(out, area, name)
            for path in (frame.rgb_path, frame.semantic_path, frame.depth_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(frame.rgb_path)
            Image.fromarray(semantic).save(frame.semantic_path)
            Image.fromarray(depth).save(frame.depth_path)  # uint16: a 16-bit grayscale PNG
            bar.update()
    bar.close()


def refuse_foreign_root(out: Path, labels: list[str]) -> None:
    """DataError unless `out` is new, empty, or a root this program made with the same label
    list: the frames already there index that list, so a new list (or a real data set's,
    overwritten) would silently change what every one of them means."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    if not any(out.iterdir()):
        return
    if not (out / MARKER_FILE).is_file():
        raise DataError(
            f"--out {out} already holds files that seglab.synthetic did not write (no "
            f"{MARKER_FILE}): nothing was changed; choose a new or empty folder"
        )
    try:
        existing = json.loads((out / LABELS_FILE).read_text())
    except (OSError, ValueError):
        existing = None
    if existing != labels:
        raise DataError(
            f"--out {out} was made with other areas, frames or seed: its {LABELS_FILE} "
            "differs from the one these frames need, and its frames would decode wrong; "
            "nothing was changed; write all areas at once into a new or empty folder"
        )


# The largest frame side: four times the real frames' 1080 px. Rendering holds several
# float arrays of a frame; at 100000 px it asked for 22 GB after writing the label list.
MAX_SIZE = 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic scenes in the 2D-3D-S format.")
    parser.add_argument("--out", required=True, help="root folder to write")
    parser.add_argument("--areas", nargs="+", default=list(AREAS), choices=AREAS, help="areas")
    frames = cli.int_range(1)
    parser.add_argument("--images-per-area", type=frames, default=24, help="frames per area")
    side = cli.int_range(16, MAX_SIZE)
    parser.add_argument("--size", type=side, default=1080, help="frame width and height in px")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    return cli.run(write_tree, args, (DataError,))


def write_tree(args: argparse.Namespace) -> int:
    generate(args.out, args.areas, args.images_per_area, args.size, args.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
