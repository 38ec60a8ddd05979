"""The content items of our TID 1500 report, built by highdicom.

Both ways of making an SR use these builders: the plain build (`sr.build_sr`
with ``cached=False``) calls them per study; the template cache
(`sr_cache.SRTemplate`) calls them once per model with placeholders.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes

from triage_core.values import AlgorithmInfo, FindingResult

from . import codes as cxr_codes
from .render import DEMO_WARNING, NOT_FOR_DIAGNOSTIC_USE
from .uids import device_uid, result_uid

__all__ = [
    "GroupValues",
    "disclaimer_container",
    "group_values",
    "measurement_group",
    "measurement_report",
]

_LANGUAGE = CodedConcept("en-US", "RFC5646", "English (United States)")


class GroupValues:
    """The per-study values of one TID 1501 group: the referenced image, the
    tracking UID and identifier, and the probability."""

    __slots__ = ("sop_class_uid", "sop_instance_uid", "tracking_uid", "tracking_identifier", "probability")

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, tracking_uid: str,
                 tracking_identifier: str, probability: float) -> None:
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.tracking_uid = tracking_uid
        self.tracking_identifier = tracking_identifier
        self.probability = probability


def group_values(source: pydicom.Dataset, finding: FindingResult, algorithm: AlgorithmInfo) -> GroupValues:
    """The values of the group of `finding` on `source`. The tracking UID
    follows the image, the finding and the model, so that the same finding
    on the same image keeps its UID across re-runs."""
    sop_instance_uid = str(source.SOPInstanceUID)
    return GroupValues(
        sop_class_uid=str(source.SOPClassUID),
        sop_instance_uid=sop_instance_uid,
        tracking_uid=result_uid(sop_instance_uid, algorithm, f"tracking:{finding.finding}"),
        tracking_identifier=f"{finding.finding} on image {sop_instance_uid}",
        probability=float(finding.probability),
    )


def measurement_group(
    algorithm: AlgorithmInfo, name: str, threshold: float, present: bool, values: GroupValues
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for finding `name` on the image of `values`.

    Tracking Identifier and Tracking Unique Identifier (rows 2-3), Finding
    (row 5), TID 4019 algorithm identification with the operating threshold
    as a parameter (row 6), the source image (row 4), Finding Site (row 8),
    the probability as NUM in UCUM "1" with its source image (TID 300), and
    present/absent at the operating point as qualitative evaluation (row 10).
    """
    concept = cxr_codes.finding_code(name)
    parameters = [f"operating threshold {threshold:.4f} (present when probability >= threshold)"]
    parameters += [f"{key}={value}" for key, value in sorted(algorithm.parameters.items())]
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=parameters,
        manufacturer=algorithm.manufacturer,
    )
    image_reference = SourceImageForMeasurement(
        referenced_sop_class_uid=values.sop_class_uid,
        referenced_sop_instance_uid=values.sop_instance_uid,
    )
    probability = Measurement(
        name=cxr_codes.PROBABILITY,
        value=values.probability,
        unit=cxr_codes.PROBABILITY_UNIT,
        referenced_images=[image_reference],
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=values.tracking_uid, identifier=values.tracking_identifier),
        finding_type=concept,
        algorithm_id=algorithm_id,
        finding_sites=[FindingSite(anatomic_location=cxr_codes.finding_site(name))],
        measurements=[probability],
        qualitative_evaluations=[
            QualitativeEvaluation(name=concept, value=cxr_codes.PRESENT if present else cxr_codes.ABSENT)
        ],
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=values.sop_class_uid,
                referenced_sop_instance_uid=values.sop_instance_uid,
            )
        ],
    )


def measurement_report(
    algorithm: AlgorithmInfo,
    groups: Sequence[MeasurementsAndQualitativeEvaluations],
    referenced_images: Sequence[pydicom.Dataset] | None = None,
) -> ContainerContentItem:
    """The TID 1500 root: language, device observer (the model), Procedure
    Reported (a chest radiograph), the Image Library of `referenced_images`,
    and the Imaging Measurements container of `groups`."""
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(algorithm),
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )
    return MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=cxr_codes.PROCEDURE_CHEST_RADIOGRAPH,
        imaging_measurements=list(groups),
        title=codes.DCM.ImagingMeasurementReport,
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(_LANGUAGE),
        referenced_images=list(referenced_images) if referenced_images else None,
    )[0]


def disclaimer_container(algorithm: AlgorithmInfo) -> ContainerContentItem:
    """TID 1500 row 12 container with the use restrictions as TEXT."""
    text = f"{NOT_FOR_DIAGNOSTIC_USE}: computer-generated triage results, not reviewed by a physician."
    if algorithm.demo:
        text += f" {DEMO_WARNING}; the probabilities carry no clinical meaning."
    container = ContainerContentItem(
        name=cxr_codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = [
        TextContentItem(name=codes.DCM.Comment, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
    ]
    return container
