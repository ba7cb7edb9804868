"""Self-contained HTML reports: sections of text, tables and embedded figures (base64 PNG).

Each capability of semlens contributes :class:`Section` objects; :class:`Report` writes them to one
``report.html`` file with no external assets.
"""

from semlens.report.document import (
    Report,
    Section,
    close_figure,
    figure_to_data_uri,
    format_mean_std,
    subplots,
    table_html,
)

__all__ = ["Report", "Section", "close_figure", "figure_to_data_uri", "subplots", "table_html", "format_mean_std"]
