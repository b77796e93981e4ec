"""CT pipeline pieces (Rahimzadeh et al. 2021): slice selection, the patient rule, augmentation.

    from caaxr_tf.ct import select_slices, decide_patient
    selection = select_slices(volume)            # [S, 512, 512] raw = HU + 1024
    decision = decide_patient(covid_probabilities[selection.kept])

The command ``python -m caaxr_tf.ct.select PATH...`` prints the selection as JSON lines.
"""

from caaxr_tf.ct.patient import PatientDecision, decide_patient, slice_is_covid
from caaxr_tf.ct.selection import SliceSelection, count_dark_pixels, select_from_counts, select_slices

__all__ = [
    "PatientDecision",
    "SliceSelection",
    "count_dark_pixels",
    "decide_patient",
    "select_from_counts",
    "select_slices",
    "slice_is_covid",
]
