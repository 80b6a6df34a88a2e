"""Label ids and names.

The label set of a run always comes from its training data and travels inside every
checkpoint; names only make outputs readable. A label's name is the one its dataset's
``dataset.json`` records; without one, the competition's exact 18 ids get their COCO names and
any other set of ids is named by its ids (ids 1..5 of another dataset are not COCO's person,
bicycle, ...).
"""

from __future__ import annotations

from collections.abc import Iterable

# COCO category ids as used by the COMP5329 data (12, "street sign", is never annotated).
COCO_NAMES: dict[int, str] = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    12: "street sign",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
}

# The 18 labels of the COMP5329 competition.
COMP5329_LABEL_IDS: list[int] = [i for i in range(1, 20) if i != 12]


def label_names(label_ids: Iterable[int], recorded: dict[str, str] | None = None) -> dict[str, str]:
    """The name of every label id of a run, keyed by id as text: the names ``recorded`` in
    ``dataset.json`` where it has any (an id it lacks is named by the id); without them the
    COCO names when the ids are exactly the competition's 18, else the ids themselves."""
    label_ids = list(label_ids)
    if recorded:
        return {str(i): recorded.get(str(i), str(i)) for i in label_ids}
    if sorted(label_ids) == COMP5329_LABEL_IDS:
        return {str(i): COCO_NAMES[i] for i in label_ids}
    return {str(i): str(i) for i in label_ids}


def label_name(label_id: int, names: dict[str, str] | None = None) -> str:
    """The name of a label id in a run's ``names`` (from :func:`label_names`), else the id itself."""
    return (names or {}).get(str(label_id), str(label_id))
