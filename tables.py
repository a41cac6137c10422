"""Read this to change how results are tested and shown: paired t-tests, Holm's correction, markdown tables. The one
table builder of evaluate.py and report.py.
"""

from scipy import stats

from data_specs import MSMARCO_V11

DEV_SETS = ["dev-small", MSMARCO_V11]  # with dl19, these give the thesis's combined table
COLUMNS = ["NDCG@10", "MAP", "MRR@10", "R-Prec", "P@10"]  # the table's names for reranker.default_measures, in order
THESIS_DL19_COLUMNS = ["NDCG@10", "MAP", "R-Prec", "P@10"]  # and MRR@10 from the dev set
ALPHA = 0.05  # significance level of the table's markers
BASELINE_MARK, FIRST_STAGE_MARK = "*", "†"


def paired_p_value(per_query, other, measure):
    """Two-sided paired t-test over the queries both systems answered; None with fewer than two queries."""
    queries = sorted(set(per_query) & set(other))
    a = [per_query[query_id][measure] for query_id in queries]
    b = [other[query_id][measure] for query_id in queries]
    if len(queries) < 2:
        return None
    if a == b:
        return 1.0  # no difference at all (scipy says nan)
    return float(stats.ttest_rel(a, b).pvalue)


def holm(p_values):
    """Holm-Bonferroni adjusted p-values, in the input order: the i-th smallest times (m - i + 1), kept monotone."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def add_significance(metrics, per_query, comparisons, measures):
    """Into `metrics[system]`: `p vs REFERENCE` -> {measure: p} per comparison, and with more than two systems
    `p (Holm) vs REFERENCE`, corrected over all comparisons of that measure."""
    for system, reference in comparisons:
        metrics[system][f"p vs {reference}"] = {
            str(m): paired_p_value(per_query[system], per_query[reference], str(m)) for m in measures
        }
    if len(metrics) <= 2:
        return
    for measure in map(str, measures):
        tested = [(s, r) for s, r in comparisons if metrics[s][f"p vs {r}"][measure] is not None]
        adjusted = holm([metrics[s][f"p vs {r}"][measure] for s, r in tested])
        for (system, reference), p in zip(tested, adjusted):
            metrics[system].setdefault(f"p (Holm) vs {reference}", {})[measure] = p


def cell(values, measure, marks):
    """A table value with the mark of every reference it differs from significantly (Holm-corrected if there)."""
    out = f"{values[measure]:.4f}"
    for mark, reference in marks:
        p = values.get(f"p (Holm) vs {reference}", values.get(f"p vs {reference}", {})).get(measure)
        if p is not None and p < ALPHA:
            out += mark
    return out


def markdown_table(header, rows):
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def data_table(metrics, columns, marks):
    rows = [[system] + [cell(values, m, marks) for m in columns.values()] for system, values in metrics.items()]
    return markdown_table(["System", *columns], rows)


def has_thesis_columns(dl19_columns, dev_columns):
    """Whether the thesis's layout can be shown: DL19's four columns and the dev set's MRR@10 (the default measures)."""
    return set(THESIS_DL19_COLUMNS) <= set(dl19_columns) and "MRR@10" in dev_columns


def thesis_layout(rows, dev):
    """The thesis's layout (Table 5.1), evaluate.py's and report.py's: NDCG@10, MAP, R-Prec, P@10 on DL19 and MRR@10 on
    a dev set. `rows`: {row label: text(spec, column) of its cells}."""
    header = ["System"] + [f"{c} (DL19)" for c in THESIS_DL19_COLUMNS] + [f"MRR@10 ({dev})"]
    body = [[label, *(text("dl19", c) for c in THESIS_DL19_COLUMNS), text(dev, "MRR@10")]
            for label, text in rows.items()]  # fmt: skip
    return markdown_table(header, body)


def thesis_table(metrics, columns, marks, dev):
    """evaluate.py's thesis layout: a row per system in both data sets."""
    systems = [system for system in metrics["dl19"] if system in metrics[dev]]
    rows = {s: lambda spec, c, s=s: cell(metrics[spec][s], columns[spec][c], marks[spec]) for s in systems}
    return thesis_layout(rows, dev)


def legend(marks, n_systems):
    parts = [f"{mark} p < {ALPHA} against {reference}" for mark, reference in marks]
    holm_note = ", Holm-corrected" if n_systems > 2 else ""
    return f"{'; '.join(parts)} (two-sided paired t-test over queries{holm_note})"
