"""The demo's text summary on a shrunk sweep's report (synthetic records, real analysis)."""
import re

from ffcv_bias import demo
from ffcv_bias.analysis import verdicts
from ffcv_bias.analysis.analyze import run_analysis
from ffcv_bias.analysis.synthetic import make_synthetic_runs


def test_the_summary_gives_machine_versions_and_a_seed_std_beside_each_number(tmp_path,
                                                                              capsys):
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.65, 0.3], range(3),
                        effects={6: {0.65: -0.05, 0.3: -0.2}}, n_per_class=200)
    run_analysis(tmp_path / "runs", "augment.min_scale", out_dir=tmp_path / "report",
                 make_plots=False)
    demo.print_machine()
    demo.print_summary(tmp_path / "report")
    out = capsys.readouterr().out
    assert f"machine: {demo.env.cpu_model()}" in out and "torch " in out and "numpy " in out
    assert "bit-identical" in out
    tau_lines = [line for line in out.splitlines() if line.startswith("  tau=")]
    means = [line for line in tau_lines if "top1=" in line]
    verdicts = [line for line in tau_lines if "one-sided Welch" in line]
    assert len(means) == 3 and all(re.search(r"± \d\.\d{4}\s+\(n=3\)", l) for l in means)
    losses = [line for line in tau_lines if "p_less=" in line]
    assert losses[0].split()[1] == "syn_006"
    assert all(line.count("±") == 2 and line.count("(n=3)") == 2 for line in losses)
    # syn_006 falls 20 points at tau 0.3 while nothing else moves: no mean rise, one loser.
    assert len(verdicts) == 2
    (at_03,) = [line for line in verdicts if line.startswith("  tau=0.3:")]
    assert "syn_006 -" in at_03 and "(n=3 / 3 seeds;" in at_03
    assert at_03.endswith("no trade-off here: the mean does not rise")


def test_the_verdict_names_a_setting_that_raises_the_mean_while_a_class_falls(tmp_path):
    """The paper's shape planted: tau 0.3 gains 4 points on 9 classes, loses 25 on one."""
    effects = {c: {0.3: 0.04} for c in range(9)}
    effects[9] = {0.3: -0.25}
    make_synthetic_runs(tmp_path / "runs", [1.0, 0.3], range(4), effects=effects,
                        n_per_class=400, noise_std=0.01)
    frames = run_analysis(tmp_path / "runs", "augment.min_scale", make_plots=False)
    (line,) = demo.tradeoff_lines(frames["runs"], frames["welch"], 1.0, "tau")
    assert line.startswith("  tau=0.3: mean +1.") and "syn_009 -2" in line
    assert line.endswith("the paper's trade-off: the mean rises significantly while a class "
                         "falls")


def test_a_rise_within_seed_noise_is_not_called_a_trade_off():
    assert verdicts.tradeoff_verdict(0.4, 0.2, 1).startswith("the paper's shape, but the mean's "
                                                          "rise is within seed noise")
    assert verdicts.tradeoff_verdict(0.4, 0.01, 0) == \
        "the mean rises and no class falls significantly"
    assert verdicts.tradeoff_verdict(-0.1, 0.9, 3) == "no trade-off here: the mean does not rise"
