import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(1)


@pytest.fixture
def tiny_model():
    """The ``tiny`` preset with a fixed random initialisation."""
    from nextstep import build_model

    return build_model("tiny", seed=0)


@pytest.fixture
def trained_like_model():
    """The tiny preset with non-zero head outputs (zero-initialised layers re-drawn)."""
    from nextstep import build_model

    model = build_model("tiny", seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.image_head.named_parameters():
            if parameter.abs().sum() == 0 and parameter.ndim == 2:
                parameter.normal_(std=0.05)
    return model


@pytest.fixture
def hf_tokenizer_dir(tmp_path):
    """A tiny byte-level BPE tokenizer saved in the Hugging Face directory layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["a red circle to the left of a blue square", "16*16", "grinning face", "0123456789*"]
    tokenizer.train_from_iterator(corpus * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    directory = tmp_path / "hf_tokenizer"
    fast.save_pretrained(str(directory))
    return directory


@pytest.fixture(autouse=True)
def no_kernel_falls_back():
    """A Triton kernel that fails during a test fails that test: `dispatch` would otherwise run its PyTorch
    reference and the comparison against that reference would pass. The failure is forgotten afterwards, so
    the next test tries the kernel again."""
    from nextstep.kernels import triton_support

    failed = triton_support.FAILED_KERNELS
    before = set(failed)
    yield
    new = {name: failed.pop(name) for name in set(failed) - before}
    assert not new, f"Triton kernels failed and ran as their PyTorch references: {new}"


#: Seconds a test may run before its process prints every thread's traceback and exits, so that a test that
#: hangs (a stream that never ends, a collective that waits for a process that is gone) fails the run with
#: where it hung, instead of holding it until CI gives up. ``NEXTSTEP_TEST_TIMEOUT=0`` turns it off.
TEST_TIMEOUT_SECONDS = float(os.environ.get("NEXTSTEP_TEST_TIMEOUT", "900"))


def _uncaptured_stderr(config):
    """The stderr that pytest's own fault handler writes to (output capture does not swallow it)."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):
        import sys

        return sys.stderr


@pytest.fixture(autouse=True)
def a_hanging_test_fails_with_its_traceback(request):
    import faulthandler

    if TEST_TIMEOUT_SECONDS <= 0:
        yield
        return
    faulthandler.dump_traceback_later(TEST_TIMEOUT_SECONDS, exit=True, file=_uncaptured_stderr(request.config))
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
