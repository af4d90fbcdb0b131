"""Where the benchmarks write their results: a bare name under benchmarks/results/, a path as given."""

import json

from benchmark_helpers import BENCHMARKS, load_benchmark


def test_a_bare_name_goes_under_results_and_a_path_is_kept():
    common = load_benchmark("common")
    assert common.results_path("backbone_decode") == BENCHMARKS / "results" / "backbone_decode.json"
    assert str(common.results_path("/tmp/run/decode.json")) == "/tmp/run/decode.json"
    assert str(common.results_path("runs/decode")) == "runs/decode"


def test_write_results_adds_the_machine_and_makes_the_folder(tmp_path):
    common = load_benchmark("common")
    path = common.write_results(str(tmp_path / "new" / "numbers.json"), {"ratio": 5.9})
    assert path == tmp_path / "new" / "numbers.json"
    written = json.loads(path.read_text())
    assert written["ratio"] == 5.9 and written["machine"]["cores"] >= 1
