"""dicom_io: DICOM objects by role, no networking (DESIGN.md section 2).

Reading: `pixels` (the displayed radiograph, bounded decoding, pixel data
integrity), `codestream` (the frame headers of compressed pixel data) and
`eligibility` (is this a frontal chest radiograph?).
Writing: `sr` (TID 1500 Structured Report; `sr_content` its items,
`sr_cache` the per-model template), `sc` (heatmap Secondary Capture), `pm`
(Parametric Map), `results` (all of one analysis), `render` (the one heatmap
renderer, also used by ``cxr-triage predict --heatmaps``), `headers` (what
results take from their source), `uids`, `codes` and `equipment`.

A pure library: it imports `triage_core` and no other package of ours.
"""
