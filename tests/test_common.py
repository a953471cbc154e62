

# --------------------------------------------------------------------------------------
# plots and tables
# --------------------------------------------------------------------------------------

def test_write_csv_is_atomic_and_keeps_the_float_format(tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"class": [0, 1], "acc": [1 / 3, 2 / 3]})
    tables.write_csv(frame, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines() == [
        "class,acc", f"0,{1 / 3!r}", f"1,{2 / 3!r}"]
    tables.write_csv(frame, tmp_path / "t.csv", float_format="%.3f")
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "0,0.333"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no temporary left


def test_save_png_writes_a_png_and_closes_the_figure(tmp_path):
    plt = plots.pyplot()
    import matplotlib
    assert matplotlib.get_backend().lower() == "agg"
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    plots.save_png(figure, tmp_path / "f.png", dpi=50, bbox_inches="tight")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(figure.number)
