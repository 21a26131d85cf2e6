"""An inference that goes on past the inputs it refuses (see :mod:`clinseg.datasets.refusals`).

:class:`RefusingDataset` reads each input; one it cannot use (a ``DataError`` naming one of its files, raised by a
reader or a transform, in a loader worker or not) comes out as a refused item instead of ending the run.
:class:`InferenceEvaluator` records refused items with the run's results writer instead of segmenting them, and
does the same for an input refused after its prediction (a layer map out of anatomical order, a heart outside the
chest); the writer lists them in the run's summary and ends the run with exit status 1 once the others are written
(:meth:`clinseg.pipelines.engine.writers.ResultLedger.raise_if_refused`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator

from clinseg.datasets.errors import ConfigError
from clinseg.datasets.refusals import INPUT_KEYS, is_refused, mark_refused, refusal, refusal_error


class RefusingDataset(Dataset):
    """A MONAI ``Dataset`` whose item is its refusal (:func:`clinseg.datasets.refusals.mark_refused`) when its input
    cannot be used, or when the data list already marks it refused. Use with ``batch_size`` 1: items of different
    keys do not collate."""

    def _transform(self, index: int):
        item = self.data[index]
        if is_refused(item):
            return dict(item)
        try:
            return super()._transform(index)
        except Exception as error:
            found = refusal(error, item)
            if found is None:
                raise
            return mark_refused(item, found)


class InferenceEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` for inference over many inputs: an input refused before its prediction (a
    :class:`RefusingDataset` item) or by the postprocessing after it is handed to ``results_writer.refuse`` and the
    run goes on. With ``skip_refused`` False, the first refusal ends the run (as a plain evaluator does).

    Args:
        results_writer: the run's :class:`clinseg.pipelines.engine.writers.ResultLedger`.
        skip_refused: go on past refused inputs.
        args, kwargs: as for ``SupervisedEvaluator``.
    """

    def __init__(self, *args, results_writer=None, skip_refused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.results_writer, self.skip_refused = results_writer, bool(skip_refused)
        if self.skip_refused and not callable(getattr(results_writer, "refuse", None)):
            raise ConfigError(
                "evaluator#results_writer",
                "is no results writer that lists refused inputs (a ResultLedger); one is needed to go on past them.",
                "Pass the config's results_writer, or set skip_refused to false.",
            )
        loader = self.data_loader
        if self.skip_refused and isinstance(loader, DataLoader) and loader.batch_size != 1:
            raise ConfigError(
                "dataloader#batch_size",
                f"is {loader.batch_size}; an inference that goes on past refused inputs reads them one at a time.",
                "Leave batch_size at 1, or set skip_refused to false.",
            )

    def _iteration(self, engine, batchdata):
        case = _single_case(batchdata)
        if case is not None and is_refused(case):
            if not self.skip_refused:
                raise refusal_error(case)
            self.results_writer.refuse(case)
            return {}
        try:
            return super()._iteration(engine, batchdata)
        except Exception as error:
            found = refusal(error, case) if self.skip_refused and case is not None else None
            if found is None:
                raise
            self.results_writer.refuse(mark_refused(case, found))
            return {}


def _single_case(batchdata) -> dict | None:
    """A collated batch of one as the item it was made of (its text values; one-element lists unwrapped), or None
    when the batch holds several items."""
    if not isinstance(batchdata, Mapping):
        return None
    case = {}
    for key, value in batchdata.items():
        if isinstance(value, str):
            case[key] = value
        elif key in INPUT_KEYS and isinstance(getattr(value, "meta", None), Mapping):
            # an image read: its file (a frame's, `volume.dcm::3`) is in its metadata
            names = value.meta.get("filename_or_obj")
            names = names if isinstance(names, (list, tuple)) else [names]
            if len(names) != 1:
                return None
            if isinstance(names[0], str):
                case[key] = names[0]
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            if len(value) != 1:
                return None
            if isinstance(value[0], str):
                case[key] = value[0]
    return case
