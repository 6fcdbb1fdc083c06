"""Evaluation on arrays (numpy, no torch): explanation metrics (``metrics``), atlas region
summaries (``atlas``) and the per-participant explanation table (``explanation_table``)."""
