"""Plots in ``vlcompress.utils.plots`` (a run's curves are checked in ``test_run.py``)."""

from vlcompress.utils.plots import plot_submodels


def test_submodel_plot_draws_one_line_per_width_or_says_there_is_nothing(tmp_path):
    rows = [
        {"submodel": "w1/4-d1/3", "width": 0.25, "accuracy": 0.80, "macs": 7.8e6},
        {"submodel": "w1/4-d1", "width": 0.25, "accuracy": 0.82, "macs": 9.2e6},
        {"submodel": "w1-d1", "width": 1.0, "accuracy": 0.87, "macs": 38.4e6},
    ]
    out = tmp_path / "slimmable.png"
    assert plot_submodels(rows, out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert not plot_submodels([{k: v for k, v in r.items() if k != "macs"} for r in rows],
                              tmp_path / "none.png")  # fmt: skip
    assert not (tmp_path / "none.png").exists()


def test_submodel_plot_takes_separate_runs_and_reference_lines(tmp_path):
    rows = [{"submodel": "w1-d1", "width": 1.0, "accuracy": 0.87, "macs": 38.4e6}]
    separate = [{"macs": 38.4e6, "accuracy": 0.70, "submodel": "w1-d1"}]
    out = tmp_path / "vs.png"
    import matplotlib.pyplot as plt

    seen = {}
    real_save = plt.Figure.savefig

    def spy(fig, *a, **k):  # the legend of the figure being written
        seen["labels"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return real_save(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        assert plot_submodels(rows, out, separate=separate, reference={"blind": 0.6})
    finally:
        plt.Figure.savefig = real_save
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert seen["labels"] == ["width 1", "trained on its own", "blind"]
