"""torch.compile with an eager fallback: failures warn once and never take the process down."""

import pytest
import torch
from torch import nn

from nextstep.compile import CompileConfig, CompileFallbackWarning, compile_module, safe_compile


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend always fails")


def test_a_failing_backend_falls_back_to_eager_with_one_warning():
    compiled = safe_compile(lambda x: x.sin() + 1, name="sine", backend=failing_backend)
    x = torch.linspace(0, 1, 5)
    with pytest.warns(CompileFallbackWarning, match=r"torch.compile of sine failed .*this backend always fails"):
        result = compiled(x)
    torch.testing.assert_close(result, x.sin() + 1)
    assert not compiled.compiled and "BackendCompilerFailed" in compiled.failure
    with _no_warnings():
        torch.testing.assert_close(compiled(x), x.sin() + 1)


def test_a_graph_break_under_fullgraph_falls_back():
    def breaks(x):
        torch._dynamo.graph_break()
        return x * 2

    compiled = safe_compile(breaks, fullgraph=True, backend="eager")
    with pytest.warns(CompileFallbackWarning):
        torch.testing.assert_close(compiled(torch.ones(2)), torch.full((2,), 2.0))


def test_errors_of_the_function_itself_are_raised_and_compilation_kept():
    def needs_matching_shapes(a, b):
        return a + b

    compiled = safe_compile(needs_matching_shapes, backend="eager")
    with pytest.raises(RuntimeError, match="must match the size"):
        compiled(torch.ones(2), torch.ones(3))
    assert compiled.compiled
    torch.testing.assert_close(compiled(torch.ones(2), torch.ones(2)), torch.full((2,), 2.0))


def test_working_compilation_is_used():
    calls = []

    def counting_backend(graph_module, example_inputs):
        calls.append(1)
        return graph_module.forward

    compiled = safe_compile(lambda x: x.cos(), backend=counting_backend)
    torch.testing.assert_close(compiled(torch.zeros(3)), torch.ones(3))
    assert calls == [1] and compiled.compiled


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("NEXTSTEP_DISABLE_COMPILE", "1")
    compiled = safe_compile(lambda x: x + 1, backend=failing_backend)
    with _no_warnings():
        torch.testing.assert_close(compiled(torch.zeros(1)), torch.ones(1))
    assert not compiled.compiled and "NEXTSTEP_DISABLE_COMPILE" in compiled.failure


def test_compile_module_keeps_parameters_and_falls_back_in_training():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    reference = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    reference.load_state_dict(module.state_dict())
    keys = list(module.state_dict())
    compile_module(module, backend=failing_backend)
    x = torch.randn(3, 4)
    with pytest.warns(CompileFallbackWarning, match="Sequential.forward"):
        loss = module(x).square().sum()
    loss.backward()
    reference(x).square().sum().backward()
    assert list(module.state_dict()) == keys
    for ours, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_compile_config_validates_and_gates():
    with pytest.raises(ValueError, match="mode"):
        CompileConfig(mode="fastest")
    with pytest.raises(ValueError, match="unknown key"):
        CompileConfig.from_dict({"enabled": True, "modes": "default"})
    module = nn.Linear(2, 2)
    assert "forward" not in vars(compile_module(module, CompileConfig(enabled=False)))
    compile_module(module, CompileConfig(enabled=True, backend="eager"))
    assert vars(module)["forward"].compiled
    with pytest.raises(ValueError, match="either a CompileConfig or compile options"):
        compile_module(nn.Linear(2, 2), CompileConfig(enabled=True), backend="eager")


class _no_warnings:
    def __enter__(self):
        import warnings

        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def test_a_copy_of_a_compiled_module_runs_its_own_weights():
    import copy

    module = compile_module(nn.Linear(2, 2), backend="eager")
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    x = torch.ones(1, 2)
    assert twin.forward.compiled and torch.equal(twin(x), torch.zeros(1, 2))
    assert not torch.equal(module(x), torch.zeros(1, 2))  # the original keeps its own
    with pytest.warns(CompileFallbackWarning):
        fallen = compile_module(nn.Linear(2, 2), backend="no-such-backend")
        fallen(x)
    assert not copy.deepcopy(fallen).forward.compiled  # a copy of an eager fallback stays eager


def test_a_compiled_module_pickles_and_runs_its_own_weights_after():
    import io
    import pickle

    module = compile_module(nn.Linear(2, 2), backend="eager")
    x = torch.ones(1, 2)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    for restored in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(module))):
        assert restored.forward.compiled and torch.equal(restored(x), module(x))
        with torch.no_grad():
            restored.weight.zero_()
            restored.bias.zero_()
        assert torch.equal(restored(x), torch.zeros(1, 2))
    with pytest.warns(CompileFallbackWarning):
        fallen = compile_module(nn.Linear(2, 2), backend="no-such-backend")
        fallen(x)
    assert not pickle.loads(pickle.dumps(fallen)).forward.compiled


def test_a_copy_made_with_compilation_disabled_runs_eagerly(monkeypatch):
    import copy
    import pickle

    module = compile_module(nn.Linear(2, 2), backend="eager")
    monkeypatch.setenv("NEXTSTEP_DISABLE_COMPILE", "1")
    for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert not copied.forward.compiled and "NEXTSTEP_DISABLE_COMPILE" in copied.forward.failure


def test_a_compile_config_s_mode_and_fullgraph_reach_torch_compile():
    from torch._dynamo import register_backend

    seen = []

    def recording(graph_module, example_inputs, **kwargs):
        seen.append(kwargs)
        return graph_module.forward

    register_backend(recording, name="nextstep_test_recording")

    class Breaking(nn.Linear):
        def forward(self, x):
            torch._dynamo.graph_break()
            return super().forward(x)

    torch._dynamo.reset()
    module = compile_module(nn.Linear(2, 2), CompileConfig(enabled=True, mode="max-autotune",
                                                           backend="nextstep_test_recording"))
    with _no_warnings():
        module(torch.ones(3, 2))
    assert seen and all(kwargs.get("mode") == "max-autotune" for kwargs in seen)
    breaking = compile_module(Breaking(2, 2), CompileConfig(enabled=True, fullgraph=True, backend="eager"))
    with pytest.warns(CompileFallbackWarning):  # a graph break under fullgraph is a failure
        breaking(torch.ones(3, 2))
    assert not vars(breaking)["forward"].compiled


def test_the_switch_off_variable_set_to_0_or_empty_leaves_compilation_on(monkeypatch):
    from nextstep.compile import DISABLE_VARIABLE

    for value, compiled in (("0", True), ("", True), (" 0 ", True), ("1", False), ("yes", False)):
        monkeypatch.setenv(DISABLE_VARIABLE, value)
        assert safe_compile(lambda x: x + 1, backend="eager").compiled is compiled, value


def test_a_compile_config_passes_every_option_to_torch_compile():
    assert CompileConfig(dynamic=True, fullgraph=True, backend="eager").options() == {
        "fullgraph": True, "dynamic": True, "backend": "eager"}
    assert CompileConfig(mode="reduce-overhead").options() == {
        "fullgraph": False, "dynamic": None, "backend": "inductor", "mode": "reduce-overhead"}


def test_a_compile_config_needs_a_backend_name():
    with pytest.raises(ValueError, match=r"backend must be a non-empty backend name, found ''"):
        CompileConfig(backend="")


def test_compiling_a_module_twice_wraps_its_forward_once():
    module = nn.Linear(2, 2)
    eager = module.forward
    compile_module(module, backend="eager")
    wrapped = vars(module)["forward"]
    assert compile_module(module, backend="eager") is module and vars(module)["forward"] is wrapped
    assert wrapped.fn == eager
    torch.testing.assert_close(module(torch.ones(1, 2)), eager(torch.ones(1, 2)))


def test_copies_of_a_module_that_fell_back_stay_eager_without_warning_again():
    import copy
    import pickle

    module = compile_module(nn.Linear(2, 2), backend=failing_backend)
    x = torch.ones(1, 2)
    with pytest.warns(CompileFallbackWarning):
        module(x)
    with _no_warnings():
        for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert not copied.forward.compiled and "this backend always fails" in copied.forward.failure
            torch.testing.assert_close(copied(x), module(x))
