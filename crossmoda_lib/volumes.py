"""Training volumes read from disk as the patches need them: memory that does not grow with the cohort.

A segmentation model of stages 06-07 trains on every volume of its fold: the pseudo-hrT2 set, the
tumour-blended volumes and, in the self-training rounds, the real hrT2 with their pseudo-labels. On
the real cohort that is several hundred float32 volumes (tens of GB) per fold. Held in memory, as
they once were, they bounded the cohort by the machine's RAM. A :class:`VolumeStore` instead unpacks
each volume once into uncompressed ``.npy`` files (the image, already clipped as the model sees it;
the binary target; its foreground voxel indices), as nnU-Net unpacks its dataset, and hands the
patch sampler a :class:`crossmoda_lib.segmentation.Case` whose arrays are memory maps. A patch then
reads only its own voxels from disk (through the page cache), and the maps are released after
each batch. What the process holds is the foreground indices of one case at a time and the
patches. The numbers are the same as with volumes in memory: the same float32 voxels are sampled
by the same random draws (tests/test_segmentation.py).

The unpacked files live in ``cache_dir``, named by a hash of what they were made from (the files'
paths, sizes and modification times, the label value, the clip percentile), so a rerun or a resumed
run reuses them and a changed input is unpacked again. Writes are atomic
(:func:`crossmoda_lib.io.save_npy_atomic`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crossmoda_lib import io as cio

#: Bump when the unpacked format changes (older files are then unpacked again).
FORMAT = 1


def _stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


class VolumeStore(Sequence):
    """Cases of ``pairs`` (image and label files, :class:`crossmoda_lib.segmentation.Pair`), read on
    access from their unpacked copies in ``cache_dir``.

    Args:
        pairs: the volumes.
        value: the label value that is the target (1 VS, 2 cochlea).
        clip_percentile: the percentile at which *real* hrT2 (``pair.real``) is clipped.
        cache_dir: where the unpacked files go (made when missing).
    """

    def __init__(self, pairs: list, value: int, clip_percentile: float | None, cache_dir: Path | str) -> None:
        self.cache_dir = Path(cache_dir)
        self.value = value
        # Folds of one structure train side by side on the same volumes: one unpacks, the others wait.
        with cio.folder_lock(self.cache_dir, "unpacking training volumes", name=".unpack.lock", wait=True):
            self.entries = [self._unpack(p, clip_percentile if p.real else None) for p in pairs]

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def _unpack(self, pair, clip: float | None) -> dict:
        from crossmoda_lib import segmentation as seg

        image_path, label_path = Path(pair.image), Path(pair.label)
        what = {"format": FORMAT, "image": _stamp(image_path), "label": _stamp(label_path), "value": self.value, "clip": clip}
        key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
        files = {part: self.cache_dir / f"{key}.{part}.npy" for part in ("image", "target", "foreground")}
        record = self.cache_dir / f"{key}.json"
        if not record.exists() or not all(f.exists() for f in files.values()):
            case = seg.load_case(image_path, label_path, self.value, clip)
            cio.save_npy_atomic(files["image"], case.image)
            cio.save_npy_atomic(files["target"], case.target)
            cio.save_npy_atomic(files["foreground"], case.foreground.astype(np.int32))
            cio.write_text_atomic(record, json.dumps({"name": case.name, **what}) + "\n")
        name = json.loads(record.read_text())["name"]
        return {"name": name, **{part: str(f) for part, f in files.items()}}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        from crossmoda_lib import segmentation as seg

        entry = self.entries[index]
        return seg.Case(
            entry["name"],
            np.load(entry["image"], mmap_mode="r"),
            np.load(entry["target"], mmap_mode="r"),
            foreground=np.load(entry["foreground"]).astype(np.int64),
        )

    def nbytes_on_disk(self) -> int:
        """Bytes of the unpacked files (what the cache costs on disk)."""
        return sum(Path(e[part]).stat().st_size for e in self.entries for part in ("image", "target", "foreground"))
