"""Figures: one builder per figure in one style, each returning a plotly ``Figure`` (scripts save them)."""
