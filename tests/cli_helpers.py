"""Stand-ins for the command line's tests: a finished training run and quick evaluation suites."""

from __future__ import annotations

from types import SimpleNamespace


def finished_trainer(is_main: bool = True, latest=None) -> SimpleNamespace:
    """What a training entry point returns, as far as the command reads it: the process's role and the
    latest checkpoint (``latest``, or None)."""
    return SimpleNamespace(context=SimpleNamespace(is_main=is_main), checkpoints=SimpleNamespace(latest=lambda: latest))


def fake_suites(monkeypatch, runs: list | None = None, asked: dict | None = None, failing=()) -> None:
    """Replace the shapes and tokenizer suites with quick ones that append their names to ``runs``, keep
    their keyword arguments in ``asked`` under their names, write a report, and raise for those in
    ``failing``."""
    import nextstep.evaluation.shapes_geneval as shapes_geneval
    import nextstep.evaluation.tokenizer_report as tokenizer_report

    def suite(name):
        def run(model, output, **kwargs):
            if runs is not None:
                runs.append(name)
            if asked is not None:
                asked[name] = kwargs
            output.mkdir(parents=True, exist_ok=True)
            (output / "report.md").write_text(f"{name} table\n")
            if name in failing:
                raise ValueError(f"{name} stopped")
            return SimpleNamespace(to_dict=lambda: {"score": 1.0}, to_markdown=lambda: f"{name} table")

        return run

    monkeypatch.setattr(shapes_geneval, "run_shapes_geneval", suite("shapes"))
    monkeypatch.setattr(tokenizer_report, "run_tokenizer_evaluation", suite("tokenizer"))
