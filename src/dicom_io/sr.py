"""The Structured Report of one study's analysis: PS3.16 TID 1500 in a Comprehensive 3D SR.

One TID 1501 measurement group per finding per image (tracking identifier
and UID, finding, finding site, probability as NUM, present/absent at the
operating threshold, TID 4019 algorithm identification with the threshold
as a parameter, source image reference), Procedure Reported (a chest
radiograph, LOINC), the Image Library, IHE AI Results (AIR) Contributing
Equipment, VerificationFlag UNVERIFIED, and the disclaimer. When the study
was reported before, the earlier reports are listed as predecessors.
Everything is encoded by highdicom (house rule 4); the model-constant parts
come from a per-model template (`sr_cache`) unless ``cached=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
from highdicom.sr import Comprehensive3DSR, ImageLibrary

from triage_core.values import AlgorithmInfo, ImageResult

from . import codes as cxr_codes
from .equipment import contributing_equipment
from .headers import copy_patient_and_study, header_view, patient_orientation, pixel_spacing
from .sc import series_description
from .sr_cache import SRTemplate, mark_explicit_little_endian
from .sr_content import disclaimer_container, group_values, measurement_group, measurement_report
from .uids import result_uid, study_key

__all__ = ["SR_SERIES_NUMBER", "build_sr", "library_view", "pair_sources", "sr_uid"]

SR_SERIES_NUMBER = 9901


def sr_uid(results: Sequence[ImageResult], algorithm: AlgorithmInfo) -> str:
    """The SOP Instance UID `build_sr` gives the report of `results` by `algorithm`."""
    return result_uid(study_key(results), algorithm, "sr")


def build_sr(
    sources: Sequence[pydicom.Dataset],
    results: Sequence[ImageResult],
    algorithm: AlgorithmInfo,
    *,
    predecessors: Sequence[pydicom.Dataset] = (),
    cached: bool = True,
) -> pydicom.Dataset:
    """Encode the findings of one study as a TID 1500 Comprehensive 3D SR.

    Args:
        sources: the analysed images (headers suffice), all of one study.
        results: one `ImageResult` per source, matched by SOP Instance UID.
        algorithm: the model that produced the results.
        predecessors: earlier SRs of this study that this one replaces
            (datasets with their Study, Series and SOP Instance UIDs and SOP
            Class UID), listed in the Predecessor Documents Sequence.
        cached: build the model-constant parts from the per-model template
            (`sr_cache`); False builds everything with highdicom (the
            reference the cache is tested against).

    Returns:
        The SR as a pydicom dataset with its file meta information.

    Raises:
        ValueError: sources and results do not match, sources span studies,
            or a finding has no code.
    """
    pairs = pair_sources(sources, results)
    study_instance_uid = str(pairs[0][0].StudyInstanceUID)
    library = [library_view(ds) for ds, _ in pairs]
    findings = [(source, finding) for source, result in pairs for finding in result.findings]
    if cached:
        # highdicom makes the document around the root container holding only the
        # Image Library (it deep-copies and re-parses what it is given, and needs
        # the library to check the evidence); the template gives the rest.
        template = SRTemplate.for_algorithm(algorithm)
        root = template.root(ImageLibrary(library))
    else:
        groups = [
            measurement_group(algorithm, finding.finding, finding.threshold, finding.present,
                              group_values(source, finding, algorithm))
            for source, finding in findings
        ]
        root = measurement_report(algorithm, groups, referenced_images=library)
    document = Comprehensive3DSR(
        evidence=[header_view(ds) for ds, _ in pairs],
        content=root,
        series_instance_uid=result_uid(study_instance_uid, algorithm, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_uid([result for _, result in pairs], algorithm),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(algorithm),
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contributing_equipment=[contributing_equipment(algorithm)],
        previous_versions=list(predecessors) or None,
    )
    if cached:
        # The measurement groups, already encoded with the study's values put in
        # (see sr_cache._EncodedItem), and the disclaimer (TID 1500 rows 6 and 12).
        document.ContentSequence = [
            *template.context(),  # language, observer context, procedure reported
            *document.ContentSequence,  # the Image Library
            template.measurements(findings),
            template.disclaimer(),
        ]
    else:
        document.ContentSequence.append(disclaimer_container(algorithm))

    # A plain dataset: highdicom's parsed view of the content (`.content`)
    # would describe only the part it was given.
    sr = pydicom.Dataset()
    sr.update(document)
    sr.file_meta = document.file_meta
    copy_patient_and_study(pairs[0][0], sr)
    if any(cxr_codes.finding_code(f.finding).scheme_designator == cxr_codes.LOCAL_CODING_SCHEME
           for _, f in findings):
        sr.CodingSchemeIdentificationSequence = cxr_codes.coding_scheme_identification()
    mark_explicit_little_endian(sr)
    return sr


def library_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """The header highdicom's Image Library entry is made from.

    For CR/DX highdicom writes the TID 1603 projection descriptors (Patient
    Orientation and Imager Pixel Spacing, both Type 1 in the DX IOD), and
    needs both. An image that does not state both validly (many CR plates
    state neither) is listed with the TID 1602 descriptors only (modality, rows,
    columns) rather than with invented values. The source is never changed.
    """
    view = header_view(source)
    orientation = patient_orientation(source)
    spacing = pixel_spacing(source, ("ImagerPixelSpacing",))
    if orientation is not None and spacing is not None:
        view.PatientOrientation = list(orientation)
        view.ImagerPixelSpacing = list(spacing[0])
    else:
        view.Modality = "OT"  # only selects highdicom's descriptor set; not written to the SR
    return view


def pair_sources(
    sources: Sequence[pydicom.Dataset], results: Sequence[ImageResult]
) -> list[tuple[pydicom.Dataset, ImageResult]]:
    """(source, result) pairs matched by SOP Instance UID, all of one study."""
    if not sources:
        raise ValueError("at least one source image is needed")
    if len(sources) != len(results):
        raise ValueError(f"{len(sources)} sources but {len(results)} results")
    by_uid = {str(r.sop_instance_uid): r for r in results}
    if len(by_uid) != len(results):
        raise ValueError("two results for the same SOP Instance UID")
    pairs = []
    for ds in sources:
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"source image lacks {keyword}")
        result = by_uid.get(str(ds.SOPInstanceUID))
        if result is None:
            raise ValueError(f"no result for source SOP Instance UID {ds.SOPInstanceUID}")
        pairs.append((ds, result))
    studies = {str(ds.StudyInstanceUID) for ds, _ in pairs}
    if len(studies) != 1:
        raise ValueError(f"sources span {len(studies)} studies; one SR reports one study")
    return pairs
