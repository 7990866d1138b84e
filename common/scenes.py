"""Synthetic image-caption data: two-object scenes, written and read in COCO captions format.

A scene holds two objects, each with a size, a colour and a shape, in a spatial relation:
"a small red circle left of a large blue square". Every image gets two reference captions
(the relation read from either object). Some (colour, shape) pairs can be held out of
training to test generalisation to unseen compositions.

The files follow COCO's captions layout (an images folder and a json with ``images`` and
``annotations``) and are read back with ``pycocotools``: the same reader works on real COCO.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.diversity import brevity_penalty, closest_length, ngrams

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 210, 40),
          "purple": (150, 60, 200), "orange": (245, 140, 30), "cyan": (40, 205, 215), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZES = {"small": 0.13, "large": 0.22}  # radius as a share of the image side
GENERATOR_VERSION = 3  # part of the cache key: bump it when the scenes change
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class SceneObject:
    size: str
    color: str
    shape: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    first: SceneObject
    relation: str  # where ``first`` is relative to ``second``
    second: SceneObject
    centres: tuple[tuple[float, float], tuple[float, float]]  # (x, y) in [0, 1]

    def captions(self) -> list[str]:
        """Two references: the relation read from either object."""
        return [f"{self.first.phrase()} {self.relation} {self.second.phrase()}",
                f"{self.second.phrase()} {RELATIONS[self.relation]} {self.first.phrase()}"]

    @classmethod
    def from_dict(cls, scene: dict) -> Scene:
        """The inverse of ``dataclasses.asdict`` (as stored in the COCO json's ``scene`` field)."""
        (x1, y1), (x2, y2) = scene["centres"]
        return cls(SceneObject(**scene["first"]), scene["relation"], SceneObject(**scene["second"]),
                   ((x1, y1), (x2, y2)))


def heldout_design(colors: Sequence[str], shapes: Sequence[str], share: float) -> tuple[tuple[str, str], ...]:
    """``round(share * colours * shapes)`` (at least one) (colour, shape) pairs to hold out, spread
    over the grid along wrapped diagonals, so no colour and no shape loses more pairs than it must
    and each keeps at least one pair seen in training."""
    n_colors, n_shapes = len(colors), len(shapes)
    count = max(1, round(share * n_colors * n_shapes))
    if not 0 < share <= 0.5 or count > n_colors * n_shapes - max(n_colors, n_shapes):
        raise ValueError(f"held-out share must be in (0, 0.5] and leave every colour and shape a seen pair; "
                         f"got {share} of {n_colors} x {n_shapes}")
    cycle = math.lcm(n_colors, n_shapes)
    return tuple((colors[i % n_colors], shapes[(i + i // cycle) % n_shapes]) for i in range(count))


@dataclass(frozen=True)
class SceneConfig:
    image_size: int = 32
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    heldout_pairs: tuple[tuple[str, str], ...] = (("red", "square"), ("blue", "circle"), ("green", "triangle"))
    noise: float = 0.03  # pixel noise, as a share of the range

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"SceneConfig.image_size must be >= 16, got {self.image_size}")
        for name, chosen, known in (("colors", self.colors, list(COLORS)), ("shapes", self.shapes, list(SHAPES))):
            if len(chosen) < 2 or len(set(chosen)) != len(chosen) or not set(chosen) <= set(known):
                raise ValueError(f"SceneConfig.{name} must be at least two distinct names of {known}, got {chosen!r}")
        unknown = [p for p in self.heldout_pairs if p[0] not in self.colors or p[1] not in self.shapes]
        if unknown:
            raise ValueError(f"SceneConfig.heldout_pairs {unknown} are not (colour, shape) pairs of "
                             f"{list(self.colors)} x {list(self.shapes)}")
        held = set(map(tuple, self.heldout_pairs))
        lost = [c for c in self.colors if all((c, s) in held for s in self.shapes)]
        lost += [s for s in self.shapes if all((c, s) in held for c in self.colors)]
        if lost:
            raise ValueError(f"SceneConfig.heldout_pairs hold out every pair of {lost}: nothing left to "
                             "learn them from")


def sample_scene(rng: np.random.Generator, config: SceneConfig, heldout: bool) -> Scene:
    """A random scene; with ``heldout`` at least one object is a held-out (colour, shape) pair,
    without it none is.

    The relation is unambiguous: the two objects lie in opposite halves of the relation's axis
    (their extents never overlap along it), and their centres are at most the smaller radius apart
    across it (their extents overlap there), so no other relation word is also true.
    """
    held = set(map(tuple, config.heldout_pairs))
    while True:
        objects = [SceneObject(str(rng.choice(list(SIZES))), str(rng.choice(list(config.colors))),
                               str(rng.choice(list(config.shapes)))) for _ in range(2)]
        has_heldout = any((o.color, o.shape) in held for o in objects)
        if has_heldout == heldout and objects[0] != objects[1]:
            break
    relation = str(rng.choice(list(RELATIONS)))
    radii = [SIZES[o.size] for o in objects]
    # each object lies wholly in its half (first | second) of the relation's axis: no overlap
    along = [rng.uniform(r + 0.02, 0.5 - r - 0.01) for r in radii]
    along[1] = 1 - along[1]
    if relation in ("right of", "below"):
        along = [1 - along[0], 1 - along[1]]
    # across the axis the centres differ by at most the smaller radius
    slack = min(radii)
    across0 = rng.uniform(radii[0] + 0.02, 1 - radii[0] - 0.02)
    across1 = rng.uniform(max(radii[1] + 0.02, across0 - slack), min(1 - radii[1] - 0.02, across0 + slack))
    horizontal = relation in ("left of", "right of")
    centres = tuple((a, c) if horizontal else (c, a) for a, c in zip(along, (across0, across1)))
    return Scene(objects[0], relation, objects[1], centres)


def relation_is_unambiguous(scene: Scene) -> bool:
    """True when the objects' extents are disjoint along the relation's axis and overlap across it."""
    (x1, y1), (x2, y2) = scene.centres
    reach = SIZES[scene.first.size] + SIZES[scene.second.size]
    along, across = (abs(x1 - x2), abs(y1 - y2)) if scene.relation in ("left of", "right of") else \
        (abs(y1 - y2), abs(x1 - x2))
    return along > reach and across < reach and across < along


def object_masks(scene: Scene, image_size: int) -> np.ndarray:
    """Pixels of each object -> (2, H, W) bool (first, second); the second is drawn over the first."""
    n = image_size
    y, x = np.mgrid[0:n, 0:n] / n + 0.5 / n
    masks = []
    for obj, (cx, cy) in zip((scene.first, scene.second), scene.centres):
        r = SIZES[obj.size]
        dx, dy = np.abs(x - cx), np.abs(y - cy)
        if obj.shape == "circle":
            inside = dx**2 + dy**2 <= r**2
        elif obj.shape == "square":
            inside = (dx <= 0.85 * r) & (dy <= 0.85 * r)
        elif obj.shape == "triangle":  # apex up: half-width grows linearly from the apex to the base
            inside = (y >= cy - r) & (y <= cy + r) & (dx <= (y - (cy - r)) / 2)
        elif obj.shape == "diamond":
            inside = dx + dy <= 1.1 * r
        elif obj.shape == "cross":
            inside = ((dx <= 0.32 * r) & (dy <= r)) | ((dy <= 0.32 * r) & (dx <= r))
        else:  # ring
            inside = (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2)
        masks.append(inside)
    masks[0] = masks[0] & ~masks[1]
    return np.stack(masks)


def render(scene: Scene, config: SceneConfig, rng: np.random.Generator) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image on a dark background."""
    n = config.image_size
    image = np.full((n, n, 3), 30.0)
    for obj, inside in zip((scene.first, scene.second), object_masks(scene, n)):
        image[inside] = COLORS[obj.color]
    image += rng.normal(0, config.noise * 255, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_coco(folder: Path, split: str, count: int, config: SceneConfig, seed: int, heldout: bool) -> Path:
    """Render ``count`` scenes into ``folder/split/`` and write ``folder/captions_split.json``.

    The json also keeps each image's scene (``scene``, an extra field COCO readers ignore),
    so attribute accuracy can be scored without parsing the references.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(count):
        scene = sample_scene(rng, config, heldout)
        name = f"{split}/{image_id:06d}.png"
        Image.fromarray(render(scene, config, rng)).save(folder / name)
        images.append({"id": image_id, "file_name": name, "width": config.image_size,
                       "height": config.image_size, "scene": asdict(scene)})
        for caption in scene.captions():
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": caption})
    path = folder / f"captions_{split}.json"
    path.write_text(json.dumps({"info": {"description": "two-object scenes", "config": asdict(config)},
                                "images": images, "annotations": annotations,
                                "licenses": [], "type": "captions"}))
    return path


@dataclass
class CaptionSet:
    """Images (N, 3, H, W) in [0, 1], their reference captions, and their scenes if known."""

    images: torch.Tensor
    captions: list[list[str]]
    scenes: list[dict | None] = field(default_factory=list)


def read_coco(annotation_file: Path, image_root: Path, image_size: int | None = None,
              limit: int | None = None) -> CaptionSet:
    """Read a COCO captions json and its images with pycocotools (synthetic or real COCO)."""
    from PIL import Image
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading time
        coco = COCO(str(annotation_file))
    ids = sorted(coco.getImgIds())[:limit]
    images, captions, scenes = [], [], []
    for image_id in ids:
        info = coco.loadImgs(image_id)[0]
        image = Image.open(image_root / info["file_name"]).convert("RGB")
        if image_size and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        captions.append([a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))])
        scenes.append(info.get("scene"))
    return CaptionSet(torch.stack(images).float() / 255, captions, scenes)


def scene_dataset(folder: Path, sizes: dict[str, int], config: SceneConfig, seed: int) -> dict[str, CaptionSet]:
    """Generate (once, cached by its settings) and read train/valid/test/heldout scene sets."""
    settings = json.dumps([GENERATOR_VERSION, asdict(config), sizes, seed], sort_keys=True)
    key = hashlib.sha1(settings.encode()).hexdigest()[:12]
    root = Path(folder) / f"scenes-{key}"
    for offset, (split, count) in enumerate(sizes.items()):
        if not (root / f"captions_{split}.json").exists():
            write_coco(root, split, count, config, seed * 1000 + offset, heldout=split == "heldout")
    return {split: read_coco(root / f"captions_{split}.json", root) for split in sizes}


# ---------------------------------------------------------------------------------------
# metrics

CAPTION = re.compile(
    rf"^a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(RELATIONS)}) "
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})$"
)
ATTRIBUTES = ("size", "color", "shape", "relation")


def attribute_scores(caption: str, scene: dict) -> dict[str, float]:
    """Share of right attributes (size, colour, shape of both objects; the relation).

    The caption may name the objects in either order (with the matching relation); a
    caption that does not parse as "a SIZE COLOUR SHAPE RELATION a SIZE COLOUR SHAPE" scores 0.
    """
    match = CAPTION.match(caption.strip())
    if match is None:
        return dict.fromkeys(ATTRIBUTES, 0.0)
    s1, c1, h1, relation, s2, c2, h2 = match.groups()
    said = [(s1, c1, h1), (s2, c2, h2)]
    truth = [tuple(scene[k][a] for a in ("size", "color", "shape")) for k in ("first", "second")]
    readings = [(truth, scene["relation"]), (truth[::-1], RELATIONS[scene["relation"]])]
    best = None
    for objects, true_relation in readings:  # score against the reading that fits best
        scores = {attribute: sum(o[i] == t[i] for o, t in zip(said, objects)) / 2
                  for i, attribute in enumerate(ATTRIBUTES[:3])}
        scores["relation"] = float(relation == true_relation)
        if best is None or sum(scores.values()) > sum(best.values()):
            best = scores
    return best


def object_scores(caption: str, scene: dict) -> list[dict]:
    """Colour and shape said for each object of the scene (first, second) -> [{"color", "shape": right?,
    "said": "colour shape" or None, "position": 0 or 1 (named first or second in the caption; None)}, ...].

    Which said object is which is decided by the relation, which the colour-shape hold-out does
    not test: the stated relation read from the first object or from the second fixes the order;
    only a relation on the wrong axis falls back to the reading that fits best (as
    ``attribute_scores``). A caption that does not parse gets nothing right.
    """
    truth = [(scene[k]["color"], scene[k]["shape"]) for k in ("first", "second")]
    match = CAPTION.match(caption.strip())
    if match is None:
        return [{"color": False, "shape": False, "said": None, "position": None} for _ in truth]
    _, c1, h1, relation, _, c2, h2 = match.groups()
    said = [(c1, h1, 0), (c2, h2, 1)]
    if relation == scene["relation"]:
        order = said
    elif relation == RELATIONS[scene["relation"]]:
        order = said[::-1]
    else:
        agree = [sum(a == b for s, t in zip(option, truth) for a, b in zip(s[:2], t))  # colour, shape
                 for option in (said, said[::-1])]
        order = said if agree[0] >= agree[1] else said[::-1]
    return [{"color": s[0] == t[0], "shape": s[1] == t[1], "said": f"{s[0]} {s[1]}", "position": s[2]}
            for s, t in zip(order, truth)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1 … BLEU-max_n (Papineni et al. 2002), whitespace tokens, uniform weights.

    BLEU-N = BP · exp( (1/N) Σ_n log p_n ), p_n = clipped n-gram matches / hypothesis n-grams,
    BP = min(1, exp(1 - r/c)) with r the closest reference length, c the hypothesis length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hypothesis, refs in zip(hypotheses, references):
        words, ref_words = hypothesis.split(), [r.split() for r in refs]
        hyp_len += len(words)
        ref_len += closest_length(len(words), [len(r) for r in ref_words])
        for n in range(1, max_n + 1):
            grams = Counter(ngrams(words, n))
            most = Counter()
            for r in ref_words:
                most |= Counter(ngrams(r, n))
            matches[n - 1] += sum(min(c, most[g]) for g, c in grams.items())
            totals[n - 1] += max(len(words) - n + 1, 0)
    brevity = brevity_penalty(hyp_len, ref_len)
    scores, log_sum = {}, 0.0
    for n in range(1, max_n + 1):
        precision = matches[n - 1] / totals[n - 1] if totals[n - 1] else 0.0
        log_sum += math.log(precision) if precision > 0 else float("-inf")
        scores[f"bleu{n}"] = brevity * math.exp(log_sum / n) if log_sum > float("-inf") else 0.0
    return scores
