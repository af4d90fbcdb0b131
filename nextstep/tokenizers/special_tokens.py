"""The special token strings of NextStep-1's sequence format."""

PAD = "[PAD]"
IMAGE_AREA = "<|image_area|>"
BEGIN_OF_IMAGE = "<|begin_of_image|>"
END_OF_IMAGE = "<|end_of_image|>"
IMAGE_PLACEHOLDER = "<|image_placeholder|>"
BEGIN_OF_PROMPT_REFINEMENT = "<|begin_of_prompt_refinement|>"
END_OF_PROMPT_REFINEMENT = "<|end_of_prompt_refinement|>"
BEGIN_OF_THINKING = "<|begin_of_thinking|>"
END_OF_THINKING = "<|end_of_thinking|>"
END_OF_TEXT = "<|endoftext|>"

#: Tokens NextStep adds to a base vocabulary, in the order of their ids in the
#: release (``[PAD]`` = 151665 ... ``<|image_placeholder|>`` = 151669 on Qwen2.5).
NEXTSTEP_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    IMAGE_AREA,
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    IMAGE_PLACEHOLDER,
    BEGIN_OF_PROMPT_REFINEMENT,
    END_OF_PROMPT_REFINEMENT,
    BEGIN_OF_THINKING,
    END_OF_THINKING,
)
