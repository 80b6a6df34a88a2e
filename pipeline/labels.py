"""Label ids and names.

The label set of a run always comes from its training data and travels inside every
checkpoint; the names below only make reports readable.
"""

from __future__ import annotations

# COCO category ids as used by the COMP5329 data (12, "street sign", is never annotated).
COCO_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    12: "street sign", 13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird",
    17: "cat", 18: "dog", 19: "horse",
}

# The 18 labels of the COMP5329 competition.
COMP5329_LABEL_IDS: list[int] = [i for i in range(1, 20) if i != 12]


def label_name(label_id: int, recorded: dict[str, str] | None = None) -> str:
    """Human-readable name of a label id: the name a dataset recorded for it (``dataset.json``,
    written by the converters), else its COCO name (the competition's ids), else the id itself."""
    if recorded and str(label_id) in recorded:
        return recorded[str(label_id)]
    return COCO_NAMES.get(label_id, str(label_id))
