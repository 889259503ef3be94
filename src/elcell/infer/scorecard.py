"""`elcell evaluate`'s figures as the terminal shows them: per label and
group, review burden, and what threshold tuning changed. Torch-free."""

from __future__ import annotations

from elcell.infer.metrics import fmt


def unknown_note(block: dict) -> str:
    """Which labels were left empty (unknown) for how many cells, or ''."""
    unknown = {label: m["unknown"] for label, m in block["per_label"].items() if m.get("unknown")}
    if not unknown:
        return ""
    counts = ", ".join(f"{label} {count}" for label, count in unknown.items())
    return (f"cells whose label is unknown (empty in the data), left out of that label's metrics: {counts}"
            + "".join(f"; {label}: {m['note']}" for label, m in block["per_label"].items() if "note" in m))


def format_report(metrics: dict) -> str:
    """The metrics as a short text table for the terminal."""
    lines = []

    def table(block: dict, title: str) -> None:
        lines.append(title)
        lines.append(f"  {'label':<14}{'cells':>6}{'unk':>6}{'pos':>6}{'thresh':>8}{'prec':>7}{'recall':>7}"
                     f"{'F1':>7}{'AUC':>7}{'AP':>7}{'review':>7}{'rec+rev':>8}")
        for label, m in block["per_label"].items():
            auc = "-" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
            ap = "-" if m["average_precision"] is None else f"{m['average_precision']:.3f}"
            lines.append(f"  {label:<14}{m['cells']:>6}{m['unknown']:>6}{m['positives']:>6}{m['threshold']:>8.3f}"
                         f"{fmt(m['precision']):>7}{fmt(m['recall']):>7}{fmt(m['f1']):>7}{auc:>7}{ap:>7}"
                         f"{m['review']:>7}{fmt(m['recall_with_review']):>8}")
        if unknown_note(block):
            lines.append(f"  {unknown_note(block)}")
        lines.append(f"  weighted F1 {fmt(block['weighted_f1'], '.4f')}, mean F1 {fmt(block['mean_f1'], '.4f')}, "
                     f"{block['cells_in_review']} of {block['cells']} cells in review, "
                     f"{block['cells_ok']} ok for every label")
        caught = ", ".join(f"{label} {fmt(m['recall_with_review'])}" for label, m in block["per_label"].items())
        lines.append(f"  review burden {block['review_burden']:.1%}: {block['cells_flagged']} flagged + "
                     f"{block['cells_in_review']} in review of {block['cells']} cells, for recall counting "
                     f"review {caught}")

    table(metrics, "all cells" + (" (TTA: mean over flips/rotations)" if metrics["tta"] else ""))
    if "without_tta" in metrics:
        table(metrics["without_tta"], "all cells without TTA")
    for name, block in metrics.get("groups", {}).items():
        table(block, f"group {name}")
    if "tuning" in metrics:
        tuning = metrics["tuning"]
        before = tuning["before"]
        lines.append(f"tuned ({tuning['method'] or 'thresholds kept'}"
                     f"{', review band ' + tuning['review_band'] if tuning['review_band'] else ''}"
                     f"{', ' + tuning['estimator'] + ' estimator' if tuning.get('estimator') else ''}) "
                     f"on these {tuning['cells']} cells -> {tuning['model']}")
        for label, d in tuning["per_label"].items():
            lines.append(f"  {label}: threshold {d['previous_threshold']:.4f} -> {d['threshold']:.4f} "
                         f"(precision {fmt(d['precision'])}, recall {fmt(d['recall'])}, F1 {fmt(d['f1'])}), "
                         f"review from {d['review_threshold']:.4f}: {d['review']} cells"
                         + (f" [{d['note']}]" if "note" in d else ""))
        lines.append(f"  before tuning: weighted F1 {fmt(before['weighted_f1'], '.4f')}, mean F1 "
                     f"{fmt(before['mean_f1'], '.4f')}; metrics tuned on the same cells are optimistic: "
                     "tune on validation cells, evaluate on others")
    if metrics["labels_not_in_data"]:
        lines.append(f"model labels not in the data (not evaluated): {metrics['labels_not_in_data']}")
    if metrics.get("columns_not_labels"):  # older metrics.json files lack it
        lines.append(f"data columns that are not the model's labels (not evaluated): {metrics['columns_not_labels']}")
    failed = metrics["failed"]
    if failed:
        lines.append(f"{len(failed)} of {metrics['images']} images could not be read and were skipped "
                     f"(first: {failed[0]['path']}: {failed[0]['error']})")
    return "\n".join(lines)
