"""All result objects of one analysis in one call: the SR, the heatmaps and the Parametric Maps.

Every object shares the patient and study of its source images and goes
into a new series; every UID is derived from what decides the object's
content (`uids`), so that a retry or a re-run replaces earlier results
rather than adding duplicates, and new content never reuses a UID.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

from triage_core.values import AlgorithmInfo, ImageResult

from .pm import parametric_maps_by_finding
from .sc import HeatmapOptions, heatmaps_by_finding
from .sr import build_sr

__all__ = ["ResultObjects", "build_results"]


@dataclass(frozen=True)
class ResultObjects:
    """The result objects of one analysis: one SR, its heatmap images and parametric maps."""

    sr: pydicom.Dataset
    heatmaps: tuple[pydicom.Dataset, ...]
    #: The finding each heatmap shows, in the order of `heatmaps` (empty when not known).
    heatmap_findings: tuple[str, ...] = ()
    parametric_maps: tuple[pydicom.Dataset, ...] = ()
    #: The finding each parametric map holds, in the order of `parametric_maps`.
    parametric_map_findings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("heatmaps", "heatmap_findings", "parametric_maps", "parametric_map_findings"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.heatmap_findings and len(self.heatmap_findings) != len(self.heatmaps):
            raise ValueError("heatmap_findings must name one finding per heatmap")
        if len(self.parametric_map_findings) != len(self.parametric_maps):
            raise ValueError("parametric_map_findings must name one finding per parametric map")

    def __iter__(self) -> Iterator[pydicom.Dataset]:
        """SR first, then heatmaps, then parametric maps: the order to store and send."""
        yield self.sr
        yield from self.heatmaps
        yield from self.parametric_maps


def build_results(
    sources: Sequence[pydicom.Dataset],
    displays: Sequence[np.ndarray],
    results: Sequence[ImageResult],
    cams_per_image: Sequence[Mapping[str, np.ndarray]],
    algorithm: AlgorithmInfo,
    *,
    parametric_maps: bool = True,
    predecessors: Sequence[pydicom.Dataset] = (),
    heatmaps: HeatmapOptions = HeatmapOptions(),
    native_cams_per_image: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> ResultObjects:
    """The SR of all `sources`, and the heatmaps (and parametric maps, when
    `parametric_maps`) of each, in one call. `predecessors` are earlier SRs
    of the study that this analysis replaces (see `sr.build_sr`).

    `cams_per_image` are the maps the heatmaps are drawn from (any size);
    `native_cams_per_image`, the maps at the model's own resolution that the
    Parametric Maps store (`cams_per_image` when not given)."""
    if not (len(sources) == len(displays) == len(results) == len(cams_per_image)):
        raise ValueError(
            "build_results: sources, displays, results and cams_per_image must have the same length, got "
            f"{len(sources)}, {len(displays)}, {len(results)}, {len(cams_per_image)}"
        )
    sr = build_sr(sources, results, algorithm, predecessors=predecessors)
    pictures: list[tuple[str, pydicom.Dataset]] = []
    maps: list[tuple[str, pydicom.Dataset]] = []
    native = native_cams_per_image if native_cams_per_image is not None else cams_per_image
    for source, display, result, cams, coarse in zip(sources, displays, results, cams_per_image, native, strict=True):
        pictures.extend(heatmaps_by_finding(source, display, result, cams, algorithm, heatmaps))
        if parametric_maps:
            maps.extend(parametric_maps_by_finding(source, result, coarse, algorithm))
    return ResultObjects(
        sr=sr,
        heatmaps=tuple(image for _, image in pictures),
        heatmap_findings=tuple(name for name, _ in pictures),
        parametric_maps=tuple(image for _, image in maps),
        parametric_map_findings=tuple(name for name, _ in maps),
    )
