"""Visual HTML reports: one per participant (``sub-<label>.html``) and one for the group
level (``group/report.html``). Each is a single self-contained file (figures embedded as
base64 PNG, inline CSS, no scripts, nothing fetched)."""
from .group import write_group_report
from .participant import T1wOutputs, discover_t1w_outputs, render_t1w_section, write_participant_report

__all__ = ["T1wOutputs", "discover_t1w_outputs", "render_t1w_section", "write_group_report",
           "write_participant_report"]
