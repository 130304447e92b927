"""The parts of report.py: the text outputs (Markdown, LaTeX tables, macros) and the figures."""
