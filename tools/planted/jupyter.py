"""Planted bugs of the Jupyter issue (#22): figure sizes, the cards' rounding, the graph's labels and the
notebooks' renderer."""

NB = "tests/cli/test_notebooks.py"
HTML_EXPORT = f"{NB}::test_the_tours_figures_are_drawn_in_its_html_export_at_900_px"

MUTANTS = (
    Mutant(  # noqa: F821 (given by tools/mutants.py)
        "figures-fixed-width",
        "on screen a figure has no fixed width: it fills its container",
        "mechintro/plots/style.py",
        "        autosize=True,",
        "        width=style.width,",
        ("tests/plots/test_plots.py::test_figures_fill_their_container_and_pngs_keep_a_fixed_size",),
    ),
    Mutant(  # noqa: F821
        "png-size-from-screen",
        "save_figure writes PNGs at Style.width, whatever the screen",
        "mechintro/plots/save.py",
        "            width=fig.layout.width or STYLE.width,",
        "            width=fig.layout.width,",
        ("tests/plots/test_plots.py::test_figures_fill_their_container_and_pngs_keep_a_fixed_size",),
    ),
    Mutant(  # noqa: F821
        "cards-full-precision",
        "a card's numbers are rounded for reading",
        "mechintro/core/html.py",
        '        return f"{value:.{DIGITS}g}"',
        "        return repr(value)",
        (f"{NB}::test_the_tours_cards_round_their_numbers",),
    ),
    Mutant(  # noqa: F821
        "graph-labels-level",
        "the graph's node labels do not overlap at 900 px",
        "mechintro/plots/graph.py",
        "            textangle=-35,",
        "            textangle=0,",
        (HTML_EXPORT,),
    ),
    Mutant(  # noqa: F821
        "notebook-json-only-renderer",
        "the tour's figures show in an HTML export (the renderer adds HTML with plotly.js)",
        "analyses/notebooks/tour.ipynb",
        "plotly_mimetype+notebook",
        "plotly_mimetype",
        (HTML_EXPORT,),
    ),
)
