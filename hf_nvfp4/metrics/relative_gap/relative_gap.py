"""relative_gap: (prediction - reference) / |reference| per item, and their mean.

Used to compare runs (an NVFP4 run's scores as predictions, the FP8 or BF16 run's as
references). Loaded by path, so it works offline:
``evaluate.load("<package>/metrics/relative_gap")``.
"""

import datasets
import evaluate

_DESCRIPTION = "Relative gap (prediction - reference) / |reference| between two runs' scores."
_KWARGS = """
Args:
    predictions: scores of the run being judged (floats)
    references: the baseline run's scores for the same metrics (floats; a zero gives NaN)
Returns:
    relative_gaps: one gap per item; mean_relative_gap: their mean
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RelativeGap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        # A zero reference has no relative gap: NaN, left out of the mean.
        gaps = [(p - r) / abs(r) if r != 0 else float("nan") for p, r in zip(predictions, references, strict=True)]
        finite = [g for g in gaps if g == g]
        return {"relative_gaps": gaps, "mean_relative_gap": sum(finite) / len(finite) if finite else float("nan")}
