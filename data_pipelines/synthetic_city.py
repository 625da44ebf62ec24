"""`synthetic_city`: a procedurally generated pair of street-scene domains with a known gap.

Every image is drawn from one scene model and rendered in one of two styles. The scene
model (shared by both domains, so the label distribution is the same) is a pinhole camera
one camera height (1.6 m) above a straight street:

* sky above a random horizon, a distant skyline of buildings along it;
* the road, a wedge towards a random vanishing point, flanked by sidewalks;
* along each side a sequence of lots at increasing depth: building facades (with a
  perspective grid of windows), parks (terrain with hedges), parks behind a fence or a
  wall; beyond the sidewalks terrain;
* objects at sampled depths, drawn far to near so nearer ones occlude: trees, poles with
  traffic lights and traffic signs, cars, trucks, buses, trams (train), pedestrians,
  riders on bicycles and motorcycles, parked bicycles and motorcycles.

Sizes follow the projection (size in pixels = focal * size / depth), so the pixel
frequencies are long-tailed like GTA5 and Cityscapes: road, building, sky and vegetation
dominate; train, motorcycle, rider and traffic light are rare (`python -m
data_pipelines.synthetic_city` prints the histogram).

The two domains render the same kind of scene differently:

* ``source`` looks rendered: one flat colour per class (cars, buses, ... pick from a
  small set of saturated paints), flat shading with a small per-instance tone, hard edges,
  no noise. Like a game engine's frames.
* ``target`` looks photographed, with a systematic gap: other per-class colours (grey
  overcast sky, muted and darker paints, a different sign and vehicle colour scheme),
  per-class texture (grain on asphalt, leafy noise on vegetation, blotches on walls),
  a global colour cast and exposure per image around a warm, dim mean, an illumination
  gradient and vignette, a Gaussian blur (sigma 0.5-1.3 px) and sensor noise (sigma
  3-8 grey levels).

A model trained on flat source colours meets new colours, textures and noise on the
target; the layout (sky up, road down, objects on the ground plane) is what transfers.
That is the situation domain adaptation is for: FDA removes the global cast, self-
training and the pulling loss have to bridge the per-class appearance.

Each image is a pure function of (seed, domain, split, index), so the splits are
reproducible and an image does not depend on the split size.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from t2s_jax.classes import CITYSCAPES_CLASSES, IGNORE_INDEX

DOMAINS = ("source", "target")
SPLITS = ("train", "validation")
DEFAULT_IMAGE_HW = (128, 256)

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY,
 PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)  # fmt: skip

# Parts of an object drawn in another colour than its body (same class).
BODY, GLASS, DARK, LAMP = range(4)


# ------------------------------------------------------------------------ scene model


@dataclasses.dataclass
class _Canvas:
    """Label map plus what the renderer needs: part and per-instance tone in [0, 1)."""

    label: np.ndarray
    part: np.ndarray
    tone: np.ndarray

    @classmethod
    def empty(cls, hw: tuple[int, int]) -> _Canvas:
        return cls(np.full(hw, SKY, np.uint8), np.zeros(hw, np.uint8), np.zeros(hw, np.float32))

    def paint(self, region: tuple[slice, slice], mask: np.ndarray, cls: int, part: int, tone: float):
        self.label[region][mask] = cls
        self.part[region][mask] = part
        self.tone[region][mask] = tone


@dataclasses.dataclass(frozen=True)
class _Camera:
    height: int
    width: int
    horizon: float  # row of the horizon
    vanish_x: float  # column of the vanishing point
    focal: float  # pixels

    def project(self, x: float, z: float, y: float = 0.0) -> tuple[float, float]:
        """Ground-plane point (lateral x, depth z, height y; camera heights) -> (row, col)."""
        return self.horizon + self.focal * (1.0 - y) / z, self.vanish_x + self.focal * x / z


def _bbox(canvas: _Canvas, top: float, bottom: float, left: float, right: float):
    """Clipped integer box and the pixel-centre coordinates inside it (None when empty)."""
    h, w = canvas.label.shape
    y0, y1 = max(int(np.floor(top)), 0), min(int(np.ceil(bottom)), h)
    x0, x1 = max(int(np.floor(left)), 0), min(int(np.ceil(right)), w)
    if y1 <= y0 or x1 <= x0:
        return None
    rows = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    return (slice(y0, y1), slice(x0, x1)), rows, cols


def _rect(canvas, top, bottom, left, right, cls, part=BODY, tone=0.0):
    box = _bbox(canvas, top, bottom, left, right)
    if box is not None:
        region, rows, cols = box
        mask = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        canvas.paint(region, mask, cls, part, tone)


def _ellipse(canvas, cy, cx, ry, rx, cls, part=BODY, tone=0.0, inner=0.0):
    """Filled ellipse; `inner` > 0 leaves a hole of that relative radius (a ring)."""
    box = _bbox(canvas, cy - ry, cy + ry, cx - rx, cx + rx)
    if box is not None and ry > 0 and rx > 0:
        region, rows, cols = box
        radius = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2
        canvas.paint(region, (radius <= 1.0) & (radius >= inner**2), cls, part, tone)


def _street(canvas: _Canvas, camera: _Camera, rng: np.random.Generator) -> tuple[float, float, float]:
    """Sky, skyline, road, sidewalks, terrain and the lots along both sides."""
    h, w = canvas.label.shape
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(w, dtype=np.float32)[None, :] + 0.5
    below = rows - camera.horizon
    lateral = (cols - camera.vanish_x) / np.maximum(below, 1e-3)  # camera heights on the ground
    road_half = rng.uniform(1.6, 2.6)
    walks = [rng.uniform(0.6, 1.6) if rng.random() < 0.9 else 0.0 for _ in range(2)]

    # Distant skyline: blocks of random height standing on the horizon.
    edges = np.cumsum(rng.uniform(0.02, 0.08, size=64) * w)
    heights = rng.uniform(0.02, 0.14, size=64) * h
    block = np.minimum(np.searchsorted(edges, cols[0]), 63)
    skyline = (rows >= camera.horizon - heights[block][None, :]) & (below < 0)
    canvas.label[skyline] = BUILDING
    canvas.tone[skyline] = 0.5
    ground = np.broadcast_to(below >= 0, (h, w))
    canvas.label[ground] = TERRAIN
    canvas.tone[ground] = rng.random()
    canvas.label[ground & (np.abs(lateral) < road_half)] = ROAD
    for side, walk in zip((-1.0, 1.0), walks):
        verge = rng.uniform(0.3, 1.0) if rng.random() < 0.4 else 0.0  # grass between road and sidewalk
        on_side = ground & (side * lateral >= road_half + verge) & (side * lateral < road_half + verge + walk)
        canvas.label[on_side] = SIDEWALK
        _lots(canvas, camera, rng, side, road_half + verge + walk)
    return road_half, walks[0], walks[1]


def _lots(canvas: _Canvas, camera: _Camera, rng: np.random.Generator, side: float, offset: float):
    """Facades / parks / fences / walls on the plane `lateral = side * offset`, far to near."""
    h, w = canvas.label.shape
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(w, dtype=np.float32)[None, :] + 0.5
    distance = side * (cols - camera.vanish_x)  # pixels from the vanishing column, > 0 on this side
    depth = camera.focal * offset / np.maximum(distance, 1e-3)  # along the street, camera heights
    height = 1.0 - (rows - camera.horizon) * offset / np.maximum(distance, 1e-3)  # above ground
    on_side = distance > 0
    z = camera.focal * offset / max(camera.vanish_x if side < 0 else w - camera.vanish_x, 1.0) * 0.7
    lots = []
    while z < 80.0:
        length = rng.uniform(6.0, 20.0)
        lots.append(
            (z, z + length, rng.choice(4, p=(0.6, 0.2, 0.1, 0.1)), rng.uniform(3.0, 14.0), rng.random())
        )
        z += length
    for z0, z1, kind, top, tone in reversed(lots):
        in_lot = on_side & (depth >= z0) & (depth < z1) & (height >= 0)
        if kind == 0:  # building with a perspective grid of windows
            facade = in_lot & (height < top)
            canvas.label[facade] = BUILDING
            canvas.part[facade] = BODY
            canvas.tone[facade] = tone
            floor = rng.uniform(1.6, 2.2)
            windows = facade & (height > 1.2) & (height < top - 0.4)
            windows &= ((height / floor) % 1.0 > 0.35) & ((depth / floor) % 1.0 > 0.4)
            canvas.part[windows] = GLASS
            continue
        hedge = in_lot & (height < rng.uniform(0.6, 1.4))
        canvas.label[hedge] = VEGETATION
        canvas.tone[hedge] = tone
        if kind == 2:  # fence with slats
            fence = in_lot & (height < 0.8) & ((depth * 4.0) % 1.0 < 0.55)
            canvas.label[fence] = FENCE
            canvas.tone[fence] = tone
        elif kind == 3:
            wall = in_lot & (height < 0.9)
            canvas.label[wall] = WALL
            canvas.tone[wall] = tone


def _vehicle(canvas, camera, x, z, cls, tone):
    """Rear view of a road vehicle standing at lateral x, depth z."""
    width, top = {CAR: (1.15, 0.95), TRUCK: (1.5, 2.3), BUS: (1.6, 2.0), TRAIN: (1.7, 2.4)}[cls]
    s = camera.focal / z
    bottom, cx = camera.project(x, z)
    half = width * s / 2

    def y(height):  # image row of a height above the ground
        return bottom - height * s

    if cls == CAR:
        _rect(canvas, y(0.6), y(0.12), cx - half, cx + half, cls, BODY, tone)
        _rect(canvas, y(top), y(0.6), cx - 0.8 * half, cx + 0.8 * half, cls, BODY, tone)
        _rect(canvas, y(top - 0.07), y(0.62), cx - 0.7 * half, cx + 0.7 * half, cls, GLASS, tone)
    else:
        _rect(canvas, y(top), y(0.15), cx - half, cx + half, cls, BODY, tone)
        if cls != TRUCK:  # buses and trams: a band of windows
            _rect(canvas, y(top - 0.25), y(1.1), cx - 0.9 * half, cx + 0.9 * half, cls, GLASS, tone)
        if cls == TRAIN:  # pantograph
            _rect(canvas, y(top + 0.4), y(top), cx - 0.05 * half, cx + 0.05 * half, cls, DARK, tone)
    for sign in (-1, 1):
        wheel = cx + sign * 0.8 * half
        _rect(canvas, y(0.3), bottom, wheel - 0.15 * half, wheel + 0.15 * half, cls, DARK, tone)
        _ellipse(canvas, y(0.45), wheel, 0.05 * s, 0.1 * half, cls, LAMP, tone)


def _person(canvas, camera, x, z, cls, tone, base=0.0):
    """A pedestrian (or a rider's body when base > 0: seated on a two-wheeler)."""
    s = camera.focal / z
    bottom, cx = camera.project(x, z, base)
    body = 0.95 if base == 0 else 0.55
    _ellipse(canvas, bottom - body * s / 2, cx, body * s / 2, 0.17 * s, cls, BODY, tone)
    _ellipse(canvas, bottom - (body + 0.09) * s, cx, 0.09 * s, 0.08 * s, cls, DARK, tone)


def _two_wheeler(canvas, camera, x, z, cls, tone, direction, riding):
    """Side view of a bicycle (ring wheels, thin frame) or motorcycle (solid wheels, body),
    with its rider when `riding`."""
    s = camera.focal / z
    bottom, cx = camera.project(x, z)
    radius = 0.22 if cls == BICYCLE else 0.21
    for sign in (-1, 1):
        wx = cx + sign * 0.38 * s
        inner = 0.75 if cls == BICYCLE else 0.0
        _ellipse(canvas, bottom - radius * s, wx, radius * s, radius * s, cls, DARK, tone, inner)
    if cls == BICYCLE:  # top tube and seat post
        tube = bottom - radius * s
        _rect(canvas, tube - 0.04 * s, tube, cx - 0.38 * s, cx + 0.38 * s, cls, BODY, tone)
        post = cx - direction * 0.1 * s
        _rect(canvas, bottom - 0.62 * s, tube, post - 0.03 * s, post + 0.03 * s, cls, BODY, tone)
    else:
        _ellipse(canvas, bottom - 0.42 * s, cx, 0.16 * s, 0.42 * s, cls, BODY, tone)
    if riding:
        _person(canvas, camera, x, z, RIDER, tone, base=0.55)


def _pole(canvas, camera, x, z, rng):
    s = camera.focal / z
    bottom, cx = camera.project(x, z)
    top = rng.uniform(2.2, 3.4)
    _rect(canvas, bottom - top * s, bottom, cx - 0.05 * s, cx + 0.05 * s, POLE, BODY, rng.random())
    attachment = rng.choice(3, p=(0.3, 0.35, 0.35))
    if attachment == 1:  # traffic light: a box with three lamps
        box_top = bottom - (top + 0.1) * s
        _rect(canvas, box_top, box_top + 0.7 * s, cx - 0.16 * s, cx + 0.16 * s, LIGHT, BODY, rng.random())
        lit = rng.integers(3)
        for k in range(3):
            row, part = box_top + (0.14 + 0.21 * k) * s, LAMP if k == lit else DARK
            _ellipse(canvas, row, cx, 0.08 * s, 0.08 * s, LIGHT, part, k / 3)
    elif attachment == 2:  # traffic sign: a disk or a panel with a symbol
        centre = bottom - (top - 0.3) * s
        tone = rng.random()
        if tone < 0.5:
            _ellipse(canvas, centre, cx, 0.26 * s, 0.26 * s, SIGN, BODY, tone)
            _ellipse(canvas, centre, cx, 0.14 * s, 0.14 * s, SIGN, GLASS, tone)
        else:
            _rect(canvas, centre - 0.22 * s, centre + 0.22 * s, cx - 0.3 * s, cx + 0.3 * s, SIGN, BODY, tone)
            _rect(canvas, centre - 0.06 * s, centre + 0.06 * s, cx - 0.2 * s, cx + 0.2 * s, SIGN, GLASS, tone)


def _tree(canvas, camera, x, z, rng):
    s = camera.focal / z
    bottom, cx = camera.project(x, z)
    trunk = rng.uniform(1.2, 2.2)
    crown = rng.uniform(0.8, 1.6)
    tone = rng.random()
    _rect(canvas, bottom - trunk * s, bottom, cx - 0.09 * s, cx + 0.09 * s, VEGETATION, DARK, tone)
    centre = bottom - (trunk + 0.6 * crown) * s
    _ellipse(canvas, centre, cx, crown * s, crown * 0.8 * s, VEGETATION, BODY, tone)


def _sample_depth(camera: _Camera, rng: np.random.Generator, near_fraction: float = 1.0) -> float:
    """Depth whose ground row lies in the image, biased towards the far half."""
    rows_below = (camera.height - camera.horizon) * near_fraction * rng.uniform(0.08, 1.0) ** 1.5
    return camera.focal / max(rows_below, 0.5)


def generate_scene(rng: np.random.Generator, hw: tuple[int, int]) -> _Canvas:
    """One random street scene: label map, parts and tones (see the module docstring)."""
    h, w = hw
    camera = _Camera(
        h,
        w,
        horizon=h * rng.uniform(0.36, 0.5),
        vanish_x=w * rng.uniform(0.3, 0.7),
        focal=w * rng.uniform(0.7, 0.9),
    )
    canvas = _Canvas.empty(hw)
    road_half, walk_left, walk_right = _street(canvas, camera, rng)
    walks = {-1.0: walk_left, 1.0: walk_right}

    objects = []  # (depth, draw): drawn far to near, so nearer objects occlude farther ones

    def place(draw, x, z, *args):
        objects.append((z, functools.partial(draw, canvas, camera, x, z, *args)))

    def sidewalk_x(side):
        return side * (road_half + max(walks[side], 0.4) * rng.uniform(0.2, 0.8))

    for _ in range(rng.poisson(4.0)):
        side = rng.choice((-1.0, 1.0))
        x = side * (road_half + walks[side] + rng.uniform(0.3, 1.5))
        place(_tree, x, _sample_depth(camera, rng), rng)
    for _ in range(rng.poisson(3.5)):
        place(_pole, rng.choice((-1.0, 1.0)) * (road_half + 0.15), _sample_depth(camera, rng), rng)
    vehicles = [CAR] * rng.poisson(2.5) + [TRUCK] * rng.poisson(0.2) + [BUS] * rng.poisson(0.15)
    vehicles += [TRAIN] * int(rng.random() < 0.08)
    for cls in vehicles:
        x = rng.uniform(-road_half + 0.7, road_half - 0.7) if cls != TRAIN else rng.uniform(-0.3, 0.3)
        place(_vehicle, x, _sample_depth(camera, rng, near_fraction=0.75), cls, rng.random())
    for _ in range(rng.poisson(2.0)):
        x = sidewalk_x(rng.choice((-1.0, 1.0)))
        place(_person, x, _sample_depth(camera, rng), PERSON, rng.random())
    for cls, rate, ridden in ((BICYCLE, 0.5, 0.6), (MOTORCYCLE, 0.35, 0.7)):
        for _ in range(rng.poisson(rate)):
            riding = rng.random() < ridden
            side = rng.choice((-1.0, 1.0))
            x = side * rng.uniform(road_half * 0.4, road_half * 0.9) if riding else sidewalk_x(side)
            z, tone, direction = _sample_depth(camera, rng), rng.random(), rng.choice((-1.0, 1.0))
            place(_two_wheeler, x, z, cls, tone, direction, riding)
    for _, draw in sorted(objects, key=lambda item: -item[0]):
        draw()
    return canvas


# ------------------------------------------------------------------------ rendering

# Per domain and class: the colours an instance can take (picked by its tone).
_SOURCE_COLOURS = {
    ROAD: [(96, 92, 108)], SIDEWALK: [(176, 150, 168)],
    BUILDING: [(168, 120, 92), (150, 150, 170), (190, 170, 120)], WALL: [(196, 184, 150)],
    FENCE: [(150, 112, 70)], POLE: [(90, 90, 96)], LIGHT: [(40, 44, 36)],
    SIGN: [(30, 80, 210), (230, 200, 30)], VEGETATION: [(60, 165, 50)], TERRAIN: [(150, 200, 90)],
    SKY: [(110, 170, 240)], PERSON: [(205, 90, 70), (70, 150, 200)], RIDER: [(245, 205, 60)],
    CAR: [(210, 30, 30), (30, 70, 200), (235, 235, 235), (240, 200, 20)], TRUCK: [(225, 225, 225)],
    BUS: [(235, 125, 30)], TRAIN: [(40, 120, 205)], MOTORCYCLE: [(30, 30, 34)], BICYCLE: [(20, 155, 165)],
}  # fmt: skip
_TARGET_COLOURS = {  # muted, darker relatives of the source colours; signs, people and vehicles repainted
    ROAD: [(80, 78, 76)], SIDEWALK: [(160, 150, 140)],
    BUILDING: [(130, 120, 110), (150, 110, 95), (175, 165, 145)], WALL: [(150, 140, 120)],
    FENCE: [(120, 110, 95)], POLE: [(120, 118, 110)], LIGHT: [(30, 32, 30)],
    SIGN: [(200, 45, 40), (235, 235, 225)], VEGETATION: [(75, 110, 50)], TERRAIN: [(140, 150, 85)],
    SKY: [(175, 190, 210)], PERSON: [(62, 58, 76), (110, 96, 80)], RIDER: [(60, 82, 120)],
    CAR: [(40, 42, 46), (150, 152, 156), (120, 30, 30), (40, 56, 90)], TRUCK: [(190, 180, 160)],
    BUS: [(205, 205, 80)], TRAIN: [(200, 60, 60)], MOTORCYCLE: [(70, 66, 76)], BICYCLE: [(44, 44, 44)],
}  # fmt: skip
_PART_COLOURS = {  # glass, dark, lamp
    "source": [(40, 60, 110), (20, 20, 24), (255, 60, 40)],
    "target": [(44, 46, 50), (30, 28, 26), (250, 200, 120)],
}


def _texture_table() -> np.ndarray:
    """Target texture amplitude per label: (large blotches, fine grain), fractions of the colour."""
    table = np.full((256, 2), (0.05, 0.04), np.float32)
    for cls, amplitude in {
        ROAD: (0.08, 0.12), SIDEWALK: (0.10, 0.08), BUILDING: (0.12, 0.05), WALL: (0.15, 0.06),
        VEGETATION: (0.25, 0.25), TERRAIN: (0.2, 0.15), SKY: (0.06, 0.0),
    }.items():  # fmt: skip
        table[cls] = amplitude
    return table


def _colour_table(colours: dict[int, list]) -> np.ndarray:
    """(4 variants, 256 labels, 3) lookup: an instance's tone picks its variant."""
    table = np.zeros((4, 256, 3), np.float32)
    for cls, options in colours.items():
        for v in range(4):
            table[v, cls] = options[v % len(options)]
    return table


_TABLES = {
    domain: (_colour_table(colours), np.array(_PART_COLOURS[domain], np.float32))
    for domain, colours in (("source", _SOURCE_COLOURS), ("target", _TARGET_COLOURS))
}
_TEXTURE = _texture_table()


def _smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [-1, 1]: a random grid upsampled bilinearly to `hw`."""
    grid = rng.uniform(-1, 1, size=(cells[0] + 1, cells[1] + 1)).astype(np.float32)
    rows = np.linspace(0, cells[0], hw[0], dtype=np.float32)
    cols = np.linspace(0, cells[1], hw[1], dtype=np.float32)
    r0, c0 = np.minimum(rows.astype(int), cells[0] - 1), np.minimum(cols.astype(int), cells[1] - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = grid[r0][:, c0] * (1 - fc) + grid[r0][:, c0 + 1] * fc
    bottom = grid[r0 + 1][:, c0] * (1 - fc) + grid[r0 + 1][:, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, edges replicated."""
    radius = max(int(np.ceil(3 * sigma)), 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        length = image.shape[axis]
        image = sum(t * np.take(padded, np.arange(i, i + length), axis=axis) for i, t in enumerate(taps))
    return image


def render(canvas: _Canvas, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Scene -> (H, W, 3) uint8 image in the style of `domain`."""
    table, parts = _TABLES[domain]
    variant = np.minimum((canvas.tone * 4).astype(np.int64), 3)
    image = table[variant, canvas.label]
    shade = 0.88 + 0.24 * (canvas.tone * 4 % 1.0)  # per-instance tone within the colour
    image = image * shade[..., None]
    has_part = canvas.part > BODY
    image[has_part] = parts[canvas.part[has_part] - 1]
    if domain == "source":
        return np.clip(image + 0.5, 0, 255).astype(np.uint8)

    hw = canvas.label.shape
    amplitude = _TEXTURE[canvas.label]
    fine_cells = (max(hw[0] // 4, 1), max(hw[1] // 4, 1))
    blotches = _smooth_noise(rng, hw, (6, 12)) + 0.5 * _smooth_noise(rng, hw, fine_cells)
    grain = rng.normal(size=hw).astype(np.float32)
    image = image * (1 + amplitude[..., 0] * blotches + amplitude[..., 1] * grain)[..., None]
    rows = np.linspace(-1, 1, hw[0], dtype=np.float32)[:, None]
    cols = np.linspace(-1, 1, hw[1], dtype=np.float32)[None, :]
    light = 1 + rng.uniform(-0.25, 0.25) * cols + rng.uniform(-0.2, 0.2) * rows  # illumination gradient
    light = light * (1 - 0.25 * (rows**2 + cols**2) / 2)  # vignette
    cast = np.array([1.08, 0.98, 0.82], np.float32) * rng.uniform(0.9, 1.1, size=3)  # warm, per image
    exposure = rng.uniform(0.7, 1.0)
    image = image * (light[..., None] * cast * exposure)
    image = 255.0 * (np.clip(image, 0, 255) / 255.0) ** rng.uniform(0.8, 1.2)  # gamma
    image = _gaussian_blur(image, rng.uniform(0.5, 1.3))
    image = image + rng.normal(scale=rng.uniform(3.0, 8.0), size=image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def example_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, DOMAINS.index(domain), SPLITS.index(split), index])


def generate_example(
    seed: int, domain: str, split: str, index: int, hw: tuple[int, int] = DEFAULT_IMAGE_HW
) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of a split: ((H, W, 3) uint8 image, (H, W) uint8 train ids)."""
    rng = example_rng(seed, domain, split, index)
    canvas = generate_scene(rng, hw)
    return render(canvas, domain, rng), canvas.label


def class_histogram(num_images: int, hw: tuple[int, int] = DEFAULT_IMAGE_HW, seed: int = 0) -> np.ndarray:
    """Pixel share of each class over `num_images` scenes."""
    counts = np.zeros(256, np.int64)
    for i in range(num_images):
        counts += np.bincount(
            generate_scene(example_rng(seed, "source", "train", i), hw).label.ravel(), minlength=256
        )
    return counts[: len(CITYSCAPES_CLASSES)] / max(counts.sum() - counts[IGNORE_INDEX], 1)


if __name__ == "__main__":
    for name, share in zip(CITYSCAPES_CLASSES, class_histogram(200)):
        print(f"{name:>14s} {100 * share:6.2f} %")
