"""The worklist policy of README "Worklist policy" (triage_core.priority), as pure functions.

Per-finding urgency classes from the model card (not a sum), a level that never drops, waits
bounded by age escalation, "not analysed" apart from "nothing flagged", and an explanation for
every priority. The database's ordering of the same rule is tested in test_worklist_query.py.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from cxr_model import ModelCard, ModelError
from cxr_model.labels import DEFAULT_URGENCY, FINDINGS, URGENCY_CLASSES
from triage_core import priority
from triage_core.priority import Level, WorklistPolicy
from triage_core.settings import Settings
from triage_core.values import FindingResult

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
POLICY = WorklistPolicy.from_minutes()


def findings(**probabilities: float) -> list[FindingResult]:
    """All 14 findings at 0.1 but those named, against thresholds of 0.5."""
    return [FindingResult(name, probabilities.get(name, 0.1), 0.5, probabilities.get(name, 0.1) >= 0.5)
            for name in FINDINGS]


def study(waited: timedelta = timedelta(0), level: Level = Level.AWAITING_ANALYSIS) -> SimpleNamespace:
    """A study row as far as the policy reads it."""
    return SimpleNamespace(priority_level=int(level), priority_detail={}, waiting_since=NOW - waited,
                           read_at=None, read_by="")


def card(**urgency: str) -> ModelCard:
    return ModelCard(name="t", version="1", labels=FINDINGS, input_size=64, in_channels=3, normalization="imagenet",
                     thresholds={f: 0.5 for f in FINDINGS}, calibration={}, evaluation={}, intended_use="test",
                     demo=False, weights_file="w.pt", weights_sha256="0" * 64, urgency=urgency)


# --- urgency classes from the model card, not a sum ---------------------------------------------


def test_the_most_urgent_flagged_class_sets_the_level_however_many_lesser_findings_there_are():
    minor_everywhere = findings(Emphysema=0.99, Fibrosis=0.99, Pleural_Thickening=0.99, Hernia=0.99,
                                Nodule=0.99, Mass=0.99, Cardiomegaly=0.99, Atelectasis=0.99, Infiltration=0.99)
    one_urgent = findings(Effusion=0.51)
    assert priority.assess(minor_everywhere, DEFAULT_URGENCY)[0] == Level.ROUTINE
    assert priority.assess(one_urgent, DEFAULT_URGENCY)[0] == Level.URGENT  # a sum of weights said otherwise
    level, flagged = priority.assess(findings(Pneumothorax=0.5, Effusion=0.95, Hernia=0.99), DEFAULT_URGENCY)
    assert level == Level.CRITICAL  # exactly at its operating threshold counts
    assert [(f.finding, f.urgency) for f in flagged] == [("Pneumothorax", "critical"), ("Effusion", "urgent"),
                                                         ("Hernia", "minor")]
    assert priority.assess(findings(), DEFAULT_URGENCY) == (Level.NOTHING_FLAGGED, [])


def test_each_class_gives_its_level_and_the_card_decides_the_class():
    assert {c: priority.URGENCY_LEVELS[c] for c in URGENCY_CLASSES} == {
        "critical": Level.CRITICAL, "urgent": Level.URGENT, "routine": Level.ROUTINE, "minor": Level.MINOR}
    # A clinical team that holds nodules critical writes so into its card; the worker passes card.urgency.
    strict = card(Nodule="critical", Pneumothorax="urgent")
    assert strict.urgency["Nodule"] == "critical" and strict.urgency["Effusion"] == DEFAULT_URGENCY["Effusion"]
    assert priority.assess(findings(Nodule=0.6), strict.urgency)[0] == Level.CRITICAL
    assert priority.assess(findings(Pneumothorax=0.9), strict.urgency)[0] == Level.URGENT
    assert priority.assess(findings(Nodule=0.6), card().urgency)[0] == Level.ROUTINE  # the defaults


def test_the_card_refuses_unknown_classes_and_labels_and_unknown_findings_count_as_urgent():
    with pytest.raises(ModelError, match="urgency.*'stat' is not one of critical, urgent, routine, minor"):
        card(Nodule="stat")
    with pytest.raises(ModelError, match="urgency.*unknown label"):
        card(Appendicitis="urgent")
    unknown = [FindingResult("Lung Lesion", 0.7, 0.5, True)]
    assert priority.assess(unknown, DEFAULT_URGENCY)[0] == Level.URGENT  # never buried
    assert priority.assess(unknown, {"Lung Lesion": "no-such-class"})[0] == Level.URGENT


def test_the_bundled_demo_card_states_its_classes():
    from cxr_model import bundled_demo_path, load_card

    demo = load_card(bundled_demo_path())
    assert demo.urgency == {f: DEFAULT_URGENCY[f] for f in FINDINGS}
    assert set(demo.urgency.values()) == set(URGENCY_CLASSES)


# --- a study never loses priority it had -------------------------------------------------------


def test_a_later_analysis_never_lowers_the_level_and_says_what_kept_it():
    row = study(timedelta(minutes=2))
    priority.record_analysis(row, findings(Pneumothorax=0.91), DEFAULT_URGENCY, POLICY, NOW)
    assert row.priority_level == Level.CRITICAL
    # New images arrive and the study is analysed again: nothing flagged this time.
    assert priority.record_analysis(row, findings(), DEFAULT_URGENCY, POLICY, NOW) == Level.NOTHING_FLAGGED
    assert row.priority_level == Level.CRITICAL
    assert row.priority_detail["analysis"] == "nothing_flagged"
    assert row.priority_detail["kept"] == {"level": "critical",
                                           "because": "critical finding flagged: Pneumothorax 0.91 >= 0.50"}
    # ... and then fails: still critical, the first reason kept.
    priority.record_status(row, "FAILED", "worker lost 3 times", NOW)
    assert row.priority_level == Level.CRITICAL and row.priority_detail["analysis"] == "not_analysed"
    assert "Pneumothorax 0.91" in row.priority_detail["kept"]["because"]
    _, text = priority.explain(row, NOW, POLICY)
    assert text.startswith("Not analysed (FAILED: worker lost 3 times)") and "Kept at critical" in text


def test_not_analysed_is_kept_when_a_later_analysis_flags_nothing():
    row = study()
    priority.record_status(row, "SKIPPED", "no eligible frontal chest radiograph: lateral", NOW)
    assert row.priority_level == Level.NOT_ANALYSED
    priority.record_analysis(row, findings(), DEFAULT_URGENCY, POLICY, NOW)  # a frontal image came later
    assert row.priority_level == Level.NOT_ANALYSED and row.priority_detail["kept"]["level"] == "not_analysed"
    priority.record_analysis(row, findings(Effusion=0.8), DEFAULT_URGENCY, POLICY, NOW)
    assert row.priority_level == Level.URGENT and "kept" not in row.priority_detail  # higher: nothing to keep


def test_an_analysis_that_comes_after_the_study_was_shown_as_overdue_keeps_that_level():
    late = study(timedelta(minutes=12))  # awaiting analysis waits 10 min, then counts as not analysed
    assert priority.standing(Level.AWAITING_ANALYSIS, late.waiting_since, NOW, POLICY).level == Level.NOT_ANALYSED
    priority.record_analysis(late, findings(Hernia=0.7), DEFAULT_URGENCY, POLICY, NOW)
    assert late.priority_level == Level.NOT_ANALYSED
    assert "already shown as not analysed" in late.priority_detail["kept"]["because"]
    on_time = study(timedelta(minutes=3))
    priority.record_analysis(on_time, findings(Hernia=0.7), DEFAULT_URGENCY, POLICY, NOW)
    assert on_time.priority_level == Level.MINOR and "kept" not in on_time.priority_detail


def test_over_time_the_level_of_a_waiting_study_only_rises():
    rng = random.Random(7)
    for base in Level:
        levels = [priority.standing(base, NOW, NOW + timedelta(minutes=m), POLICY).level
                  for m in sorted(rng.uniform(0, 900) for _ in range(200))]
        assert levels == sorted(levels), base
        assert levels[0] == max(base, Level.NOTHING_FLAGGED)


# --- bounded waits ---------------------------------------------------------------------------


def test_every_waiting_study_reaches_urgent_within_the_configured_waits_and_critical_stays_reserved():
    defaults = {"awaiting_analysis": 10, "nothing_flagged": 240, "minor": 120, "routine": 60, "not_analysed": 30}
    assert {k: v.total_seconds() / 60 for k, v in POLICY.waits.items()} == defaults
    bounds = {base: POLICY.longest_wait(base) for base in Level}
    assert bounds == {
        Level.AWAITING_ANALYSIS: timedelta(minutes=10 + 30), Level.NOTHING_FLAGGED: timedelta(hours=7, minutes=30),
        Level.MINOR: timedelta(hours=3, minutes=30), Level.ROUTINE: timedelta(minutes=90),
        Level.NOT_ANALYSED: timedelta(minutes=30), Level.URGENT: timedelta(0), Level.CRITICAL: timedelta(0)}
    for base, bound in bounds.items():
        at_bound = priority.standing(base, NOW - bound, NOW, POLICY)
        just_before = priority.standing(base, NOW - bound + timedelta(seconds=1), NOW, POLICY)
        assert at_bound.level == max(base, Level.URGENT)
        assert at_bound.next_escalation is None
        if bound:
            assert just_before.level < Level.URGENT
        years = priority.standing(base, NOW - timedelta(days=3650), NOW, POLICY)
        assert years.level == max(base, Level.URGENT)  # age never makes a study critical


def test_escalation_climbs_one_level_per_wait_and_the_waits_are_settings():
    where = priority.standing(Level.NOTHING_FLAGGED, NOW - timedelta(hours=6, minutes=5), NOW, POLICY)
    assert where.level == Level.ROUTINE
    assert [(level.key, NOW - at) for level, at in where.escalations] == [
        ("minor", timedelta(hours=2, minutes=5)), ("routine", timedelta(minutes=5))]
    assert where.next_escalation == (Level.NOT_ANALYSED, NOW + timedelta(minutes=55))
    settings = Settings(worklist_escalation_minutes="nothing_flagged=30, routine=15")
    fast = WorklistPolicy.from_settings(settings)
    assert fast.longest_wait(Level.NOTHING_FLAGGED) == timedelta(minutes=30 + 120 + 15 + 30)
    with pytest.raises(ValueError, match="unknown level"):
        Settings(worklist_escalation_minutes="critical=5")  # critical and urgent do not escalate
    with pytest.raises(ValueError, match=r"must be minutes in \(0, 10080\]"):
        Settings(worklist_escalation_minutes="minor=0")


# --- "not analysed" is not "nothing flagged" -----------------------------------------------------


def test_not_analysed_and_nothing_flagged_are_different_levels_and_say_so():
    nothing = study(timedelta(minutes=1))
    priority.record_analysis(nothing, findings(), DEFAULT_URGENCY, POLICY, NOW)
    skipped = study(timedelta(minutes=1))
    priority.record_status(skipped, "SKIPPED", "modality CT is not a radiograph (CR/DX)", NOW)
    failed = study(timedelta(minutes=1))
    priority.record_status(failed, "FAILED", "RuntimeError: out of memory", NOW)
    awaiting = study(timedelta(minutes=1))
    assert [priority.analysis_of(s) for s in (nothing, skipped, failed, awaiting)] == [
        "nothing_flagged", "not_analysed", "not_analysed", "awaiting_analysis"]
    assert nothing.priority_level == Level.NOTHING_FLAGGED < skipped.priority_level == Level.NOT_ANALYSED
    assert priority.standing(awaiting.priority_level, awaiting.waiting_since, NOW, POLICY).key == "awaiting_analysis"
    texts = [priority.explain(s, NOW, POLICY)[1] for s in (nothing, skipped, failed, awaiting)]
    assert texts[0].startswith("Analysed: no finding at or above its operating threshold.")
    assert texts[1].startswith("Not analysed (SKIPPED: modality CT is not a radiograph (CR/DX)): read it without AI")
    assert texts[2].startswith("Not analysed (FAILED: RuntimeError: out of memory)")
    assert texts[3].startswith("Awaiting analysis")


# --- the explanation -------------------------------------------------------------------------


def test_the_explanation_names_the_finding_its_threshold_the_escalation_and_what_comes_next():
    row = study(timedelta(minutes=80))
    priority.record_analysis(row, findings(Nodule=0.66, Hernia=0.8), DEFAULT_URGENCY, POLICY,
                             NOW - timedelta(minutes=79))
    where, text = priority.explain(row, NOW, POLICY)
    assert where.level == Level.NOT_ANALYSED and where.escalated  # routine, raised one level after 60 min
    assert text == ("Routine finding flagged: Nodule 0.66 (operating threshold 0.50); also Hernia 0.80 (minor). "
                    "Escalated by age to not analysed at 1 h 00 min (waiting 1 h 20 min). "
                    "Climbs to urgent in 10 min if still unread.")
    where, text = priority.explain(row, NOW + timedelta(hours=1), POLICY)
    assert text.endswith("Escalated by age to not analysed at 1 h 00 min, then to urgent at 1 h 30 min "
                         "(waiting 2 h 20 min). Urgent is as high as age raises a study.")
    critical = study(timedelta(minutes=3))
    priority.record_analysis(critical, findings(Pneumothorax=0.7), DEFAULT_URGENCY, POLICY, NOW)
    assert priority.explain(critical, NOW, POLICY)[1].endswith("Waiting 3 min.")


def test_read_studies_leave_the_queue_and_new_images_bring_them_back_waiting_from_then():
    row = study(timedelta(hours=9))
    priority.record_analysis(row, findings(), DEFAULT_URGENCY, POLICY, NOW - timedelta(hours=9))
    priority.mark_read(row, reader="dr.house", now=NOW)
    where, text = priority.explain(row, NOW, POLICY)
    assert where is None and text.endswith("Read by dr.house at 2026-03-02 12:00 UTC: no longer waiting.")
    later = NOW + timedelta(days=2)
    priority.record_status(row, "RECEIVING", "new instance after DONE", later)
    assert row.read_at is None and row.waiting_since == later  # a new wait, at the level it has
    assert priority.standing(row.priority_level, row.waiting_since, later, POLICY).level == Level.NOTHING_FLAGGED
    priority.mark_read(row, reader="dr.house", now=later)
    priority.mark_unread(row)
    assert row.read_at is None and row.waiting_since == later
