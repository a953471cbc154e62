"""The demo's text summary on a shrunk sweep's report (synthetic records, real analysis)."""
import re

from ffcv_bias import demo
from ffcv_bias.analysis.analyze import run_analysis
from ffcv_bias.analysis.synthetic import make_synthetic_runs


def test_the_summary_gives_machine_versions_and_a_seed_std_beside_each_number(tmp_path,
                                                                              capsys):
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.65, 0.3], range(3),
                        effects={6: {0.65: -0.05, 0.3: -0.2}}, n_per_class=200)
    run_analysis(tmp_path / "runs", "augment.min_scale", out_dir=tmp_path / "report",
                 make_plots=False)
    demo.print_summary(tmp_path / "report")
    out = capsys.readouterr().out
    assert f"machine: {demo.cpu_model()}" in out and "torch " in out and "numpy " in out
    assert "bit-identical" in out
    tau_lines = [line for line in out.splitlines() if line.startswith("  tau=")]
    means = [line for line in tau_lines if "top1=" in line]
    assert len(means) == 3 and all(re.search(r"± \d\.\d{4}\s+\(n=3\)", l) for l in means)
    losses = [line for line in tau_lines if "p_less=" in line]
    assert losses[0].split()[1] == "syn_006"
    assert all(line.count("±") == 2 and line.count("(n=3)") == 2 for line in losses)
