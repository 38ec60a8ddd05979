"""ChestX-ray14 finding names in the model's output order (Wang et al. 2017)."""

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


#: How soon a flagged finding needs a radiologist, highest first. The worklist (triage_core.priority)
#: ranks a study by the most urgent class among its flagged findings; a model card states the class of
#: each of its labels (``ModelCard.urgency``).
URGENCY_CLASSES: tuple[str, ...] = ("critical", "urgent", "routine", "minor")

#: The class of each ChestX-ray14 finding when a card states none (older cards, imports): a clinical
#: team deploying real weights should review them and write its own into the card.
#: critical: may need treatment within the hour (a pneumothorax can be under tension);
#: urgent: acute disease to act on the same day (infection, fluid);
#: routine: needs a report and often work-up, not the same hour (a mass or nodule, a large heart, collapse);
#: minor: chronic or incidental.
DEFAULT_URGENCY: dict[str, str] = {
    "Pneumothorax": "critical",
    "Pneumonia": "urgent",
    "Consolidation": "urgent",
    "Edema": "urgent",
    "Effusion": "urgent",
    "Mass": "routine",
    "Nodule": "routine",
    "Cardiomegaly": "routine",
    "Atelectasis": "routine",
    "Infiltration": "routine",
    "Emphysema": "minor",
    "Fibrosis": "minor",
    "Pleural_Thickening": "minor",
    "Hernia": "minor",
}
#: A label the card does not classify and the defaults do not know: treated as urgent, so that an
#: unknown finding is never buried.
UNKNOWN_LABEL_URGENCY = "urgent"
