"""The demo (``python -m confusion_kernels demo``): the imbalanced split follows the protocol,
the verdicts say what the numbers say, and a shortened run writes a complete report."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
pytest.importorskip("matplotlib", reason="the demo's figures need matplotlib")
pytest.importorskip("tqdm", reason="the demo's progress bars need tqdm")

from confusion_kernels.demo import data, report  # noqa: E402
from confusion_kernels.demo.cli import main  # noqa: E402


def test_imbalanced_split_follows_the_protocol():
    from sklearn.datasets import load_digits

    total = torch.bincount(torch.from_numpy(load_digits().target), minlength=10)
    for seed in (0, 1):
        split = data.imbalanced_digits(seed)
        train = torch.bincount(split.y_train, minlength=10)
        test = torch.bincount(split.y_test, minlength=10)
        full_train = total - test  # what the stratified split gave the training side
        assert torch.all((test - data.TEST_FRACTION * total).abs() <= 1)  # stratified, untouched
        for c in range(10):
            if c in data.MINORITY:
                assert train[c] == max(1, round(data.KEEP_MINORITY * int(full_train[c])))
            else:
                assert train[c] == full_train[c]
        assert split.x_train.min() >= 0 and split.x_train.max() <= 1
    a, b = data.imbalanced_digits(0), data.imbalanced_digits(1)
    assert not torch.equal(a.y_train, b.y_train) or not torch.equal(a.x_train, b.x_train)


def test_verdicts_compare_with_the_spread():
    results = {"CE": [{"accuracy": 0.9, "macro_f1": 0.90, "minority_recall": 0.80},
                      {"accuracy": 0.9, "macro_f1": 0.92, "minority_recall": 0.82}],
               "X": [{"accuracy": 0.9, "macro_f1": 0.91, "minority_recall": 0.95},
                     {"accuracy": 0.9, "macro_f1": 0.92, "minority_recall": 0.97}]}
    (line,) = report.verdicts(results)
    assert "macro-F1 +0.005 (within the spread" in line
    assert "recall of digits 0-4 +0.150 (better than CE)" in line
    one = {k: v[:1] for k, v in results.items()}
    assert "one seed" in report.verdicts(one)[0]
    for runs, gain in ((results["CE"], (0.50, 0.52)), (results["X"], (0.70, 0.71))):
        for run, value in zip(runs, gain):
            run.update(map_at_r=value, recall_at_1=0.9, recall_at_10=1.0)
    (line,) = report.verdicts(results)
    assert "MAP@R +0.195 (better than CE)" in line
    assert report.results_table(results)[0].endswith("| MAP@R | R@1 | R@10 |")


def test_retrieval_scores_of_a_trained_method():
    """The demo's retrieval columns are ck.retrieval_metrics of the test representation."""
    import confusion_kernels as ck
    from confusion_kernels.demo import evaluation, training

    split = data.imbalanced_digits(0)
    trained = training.train(training.METHODS[0], split, dim=4, seed=0, epochs=1,
                             backend="auto")
    got = evaluation.retrieval_scores(trained, split.x_test, split.y_test)
    _, z, _ = trained.outputs(split.x_test)
    want = ck.retrieval_metrics(z, split.y_test, k=(1, 10))
    assert got == {"map_at_r": want["mean_average_precision_at_r"],
                   "recall_at_1": want["recall_at_1"], "recall_at_10": want["recall_at_10"]}


def test_short_run_writes_the_report(tmp_path):
    path = main(["--quick", "--epochs", "2", "--dim", "4", "--out", str(tmp_path)])
    text = path.read_text()
    for heading in ("## Results", "## Similar labels", "## Out of distribution",
                    "## Kernel speed on this machine"):
        assert heading in text
    assert "| method | accuracy | macro-F1 | recall of digits 0-4 | MAP@R | R@1 | R@10 |" in text
    for name in ("| CE |", "| CE + ASLoss |", "| CE + ASLoss (class_mean) |", "| Affinity (m=1) |",
                 "| Affinity (m=5) |", "| CE + NCL |"):
        assert name in text
    for key in ("ce", "ce_as", "ce_as_class", "affinity1", "affinity5", "ce_ncl"):
        assert (tmp_path / f"rep2d_{key}.png").stat().st_size > 0
        assert (tmp_path / f"confusion_{key}.png").stat().st_size > 0
    assert (tmp_path / "similar_labels.png").stat().st_size > 0


def test_module_entry_point_lists_its_commands():
    out = subprocess.run([sys.executable, "-m", "confusion_kernels", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "confusion_kernels", "nonsense"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0"], "positive integer"), (["--epochs", "-1"], "positive integer"),
    (["--dim", "0"], "positive integer"), (["--seeds", "-1"], "positive integer"),
    (["--device", "nowhere"], "not a device"), (["--device", "meta"], "cpu or cuda"),
    (["--out", ""], "must be a path"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, capsys, argv, message):
    """Issue 26: --seeds 0 ran 3 seeds, --epochs 0 the default, --epochs -1 wrote a report of
    untrained networks with exit code 0, others gave tracebacks."""
    from confusion_kernels.demo import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "report")]))
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report").exists()  # nothing written


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    from confusion_kernels.demo import cli

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["--out", str(f)])
    assert "is not a folder" in capsys.readouterr().err
