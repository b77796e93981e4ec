"""Run slice selection over CT series found on disk, and the command that prints it.

    python -m caaxr_tf.ct.select PATH [PATH ...]

PATH is a series folder (``.../patient7/SR_2`` of TIFF slices), a patient folder, a DICOM
series folder or any tree holding them; every series found is one sequence. The command
prints JSON lines:

    {"type": "slice", "series": "patient7/SR_2", "file": ".../IM00012.tif", "index": 11, "dark_pixels": 14213, "kept": true}
    {"type": "series", "series": "patient7/SR_2", "patient": "patient7", "folder": "...", "threshold": 9990.0, "kept": 13, "total": 21}
    {"type": "skipped", "path": ".../IM00022.tif", "field": "BitsPerSample", "reason": "expected a 16-bit slice, found 8-bit"}

Bad slices are reported and left out; the rest of their series is selected. The exit status
is 0 when at least one series was selected, 1 when none was.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from caaxr_tf.ct.selection import MIN_SLICES, SLICE_SHAPE, SliceSelection, count_dark_pixels, select_from_counts
from caaxr_tf.data.ct_series import CTSeries, find_ct_series
from caaxr_tf.data.records import InputError, Skipped


@dataclass
class SeriesSelection:
    """Selection over the decodable slices of one series.

    ``paths`` are the slices that were decoded, in order, and ``selection`` holds one count and
    flag per path; ``selection`` is None when fewer than two slices could be decoded.
    """

    series: CTSeries
    paths: list[str] = field(default_factory=list)
    selection: SliceSelection | None = None
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def kept_paths(self) -> list[str]:
        if self.selection is None:
            return []
        return [path for path, kept in zip(self.paths, self.selection.kept) if kept]


def select_series(series: CTSeries, shape: tuple[int, int] = SLICE_SHAPE) -> SeriesSelection:
    """Decode each slice of ``series`` in turn, count its dark pixels and select.

    Only one slice is in memory at a time (a 406-slice series needs about 1 MB of pixels).
    """
    outcome = SeriesSelection(series=series)
    counts = []
    for path, pixels in series.iter_slices(shape):
        if isinstance(pixels, InputError):
            outcome.skipped.append(pixels.as_skipped())
            continue
        outcome.paths.append(path)
        counts.append(count_dark_pixels(pixels))
    if len(counts) < MIN_SLICES:
        reason = f"{len(counts)} decodable slice(s); selection needs at least {MIN_SLICES}"
        outcome.skipped.append(Skipped(series.folder, "slices", reason))
        return outcome
    outcome.selection = select_from_counts(counts)
    return outcome


def selection_lines(paths: Sequence[str]) -> Iterator[dict]:
    """The command's JSON records for every series under ``paths``, in order."""
    for path in paths:
        scan = find_ct_series(path)
        for skipped in scan.skipped:
            yield dict(type="skipped", **skipped.as_dict())
        for series in scan.series:
            outcome = select_series(series)
            for skipped in outcome.skipped:
                yield dict(type="skipped", **skipped.as_dict())
            if outcome.selection is None:
                continue
            selection = outcome.selection
            for index, (file, count, kept) in enumerate(zip(outcome.paths, selection.counts, selection.kept)):
                yield dict(type="slice", series=series.series_id, file=file, index=index,
                           dark_pixels=int(count), kept=bool(kept))
            yield dict(type="series", series=series.series_id, patient=series.patient_id,
                       folder=series.folder, threshold=selection.threshold,
                       kept=selection.num_kept, total=selection.total)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m caaxr_tf.ct.select",
        description="Select the open-lung slices of CT series (Rahimzadeh et al. 2021); prints JSON lines.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a series folder, a patient folder, a DICOM series folder or any tree of them")
    args = parser.parse_args(argv)
    selected = 0
    try:
        for record in selection_lines(args.paths):
            selected += record["type"] == "series"
            print(json.dumps(record), flush=record["type"] == "series")
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        sys.stdout = open(os.devnull, "w")
        return 0
    if not selected:
        print("no series could be selected", file=sys.stderr)
    return 0 if selected else 1


if __name__ == "__main__":
    sys.exit(main())
