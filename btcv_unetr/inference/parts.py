"""A folder of scans over many processes and nodes: who segments which case, who holds the output folder,
which finished masks a run keeps.

    Part                ``--part_id I`` of ``--num_parts K`` (a cluster job array, no torch.distributed) and this
                        process's rank in its torchrun world: the cases it segments, each case exactly once
    prepare_output_dir  the output folder exists and can be written, or one line
    held_output_folder  the folder's lock for the run: exclusive for a whole run (rank 0 holds it for its torchrun
                        world), shared by the parts of a job array, each part holding a lock of its own too
    mask_problem        why a finished mask cannot be kept by ``--continue`` (unreadable, truncated, another grid)

Every process writes only its own cases' files, each atomically (files.atomic_path), so the ranks and parts
share one output folder without coordination beyond the lock; a case's mask does not depend on which
process made it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..config.schema import InferConfig
from ..data.images import image_shape, is_picture, read_volume
from ..distributed import Context, raise_on_every_rank
from ..errors import UserError
from ..files import disk_full, folder_lock, make_folder

T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` (a job array's), and this process's ``rank`` in the ``world`` of torchrun's
    processes that segment that part together."""

    index: int = 0
    count: int = 1
    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, infer: InferConfig, context: Context) -> Part:
        return cls(infer.part_id, infer.num_parts, context.rank, context.world_size)

    @property
    def whole(self) -> bool:
        """True when this part is every case (no ``--num_parts``)."""
        return self.count == 1

    def cases(self, cases: Sequence[T]) -> list[T]:
        """This part's cases of the sorted list ``cases``: case i where i mod count = index."""
        return list(cases[self.index::self.count])

    def mine(self, cases: Sequence[T]) -> list[T]:
        """This process's cases: every ``world``-th of its part's, from its ``rank``."""
        return self.cases(cases)[self.rank::self.world]

    def __str__(self) -> str:
        return f"part {self.index}/{self.count}"


def prepare_output_dir(path: Path) -> None:
    """Create ``path`` and try a file in it, or one line (a full disk: :class:`~btcv_unetr.files.DiskFull`)."""
    try:
        make_folder(path)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise disk_full(path, exc, "cannot be written") or UserError(
            f"output folder {path} cannot be written ({exc.strerror}): choose another --output_dir") from None


@contextlib.contextmanager
def held_output_folder(out_dir: Path, part: Part, context: Context) -> Iterator[None]:
    """Create and lock ``out_dir`` for the block; rank 0 does it for its torchrun world, and every rank stops in
    the same one line when the folder cannot be used (as training's run folder).

    A whole run holds the folder's ``.lock`` exclusively (a second run into it is refused). The parts of a job
    array share ``.lock`` (a whole run cannot start beside them) and each holds ``.lock.part-I-of-K`` of its own
    exclusively, so that a part started twice (a requeued job) is refused rather than racing itself.
    """
    with contextlib.ExitStack() as stack:
        problem = None
        if context.is_main:
            try:
                prepare_output_dir(out_dir)
                purpose = "inference" if part.whole else f"inference {part}"
                stack.enter_context(folder_lock(out_dir, purpose, shared=not part.whole))
                if not part.whole:
                    stack.enter_context(folder_lock(out_dir, purpose, name=f".lock.part-{part.index}-of-{part.count}"))
            except UserError as exc:
                problem = str(exc)
        raise_on_every_rank(problem, context)
        yield


def mask_problem(mask: Path, image: Path) -> str | None:
    """Why the finished mask ``mask`` of the scan ``image`` cannot be kept, or None when it is complete: every
    voxel is read (a truncated or corrupt file fails there) and its grid must be the scan's."""
    try:
        volume = read_volume(mask)  # reads the voxels, not only the header
        expected = read_volume(image).spatial_shape if is_picture(image) else image_shape(image)[:3]
    except Exception as exc:  # nibabel, gzip, zlib and SimpleITK raise many types for damaged files
        return f"unreadable: {exc.__class__.__name__}: {exc}"
    if tuple(volume.spatial_shape) != tuple(expected):
        return f"its shape {tuple(volume.spatial_shape)} is not the scan's {tuple(expected)}"
    return None
