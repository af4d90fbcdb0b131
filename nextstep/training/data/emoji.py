"""Noto Color Emoji glyphs captioned with their Unicode names ("woman mechanic medium skin tone").

With ``captions="aliases"`` the same glyphs come captioned with their other
names, the short names of chat apps ("joy", "heart eyes", "dancer"): one sample
per alias that says more than the name (flags' aliases, which only restate the
country, are left out). With ``captions="unicode"`` they come captioned with
their Unicode character names and the informal aliases of the Unicode names
list ("smiling face with open mouth", "face palm", "dog dirt"), for emoji of one
code point: again one sample per caption that the names and aliases lack.

Needs the Debian packages ``fonts-noto-color-emoji`` (the glyphs) and
``unicode-data`` (the emoji list and groups, the names list) and the PyPI package ``emoji``
(the names); ``make data`` installs them. The split into train and test is by
*base* emoji: all skin-tone variants of one emoji fall on the same side, so the
test set holds emoji the model never saw in any tone.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from nextstep.config import Config, require
from nextstep.training.data.base import ImageTextDataset, ImageTextSample
from nextstep.training.data.loader import mix_seed
from nextstep.training.data.registry import register_dataset

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
NAMES_LIST_PATH = Path("/usr/share/unicode/NamesList.txt")
#: The only size at which the bitmap font renders (136 x 128 pixel glyphs).
FONT_SIZE = 109
FLAG_SUBGROUPS = ("country-flag", "subdivision-flag")
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
VARIATION_SELECTOR = "\ufe0f"
INSTALL_HINT = "run `make data` (or `apt-get install -y fonts-noto-color-emoji unicode-data` and `pip install emoji`)"


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji.

    Attributes:
        text: the emoji's characters.
        name: its caption.
        base: the emoji without skin-tone modifiers (the split key).
        group: Unicode group, e.g. ``Smileys & Emotion``.
        subgroup: Unicode subgroup, e.g. ``face-smiling``.
    """

    text: str
    name: str
    base: str
    group: str
    subgroup: str


def base_emoji(text: str) -> str:
    """``text`` without skin-tone modifiers and variation selectors."""
    return "".join(ch for ch in text if ch not in SKIN_TONES and ch != VARIATION_SELECTOR)


def _require_file(path: Path, package: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"the emoji dataset needs {path} from the Debian package {package!r}, found nothing; "
            f"{INSTALL_HINT}"
        )


def _emoji_names():
    try:
        import emoji
    except ImportError:
        raise ImportError(f"the emoji dataset needs the PyPI package 'emoji' for names; {INSTALL_HINT}") from None
    return emoji.EMOJI_DATA


def _caption(text: str, test_name: str, subgroup: str, names) -> str:
    entry = names.get(text)
    if entry is not None:
        name = entry["en"].strip(":").replace("_", " ")
    else:
        name = test_name.replace(":", "")
    if subgroup in FLAG_SUBGROUPS:
        name = name.removeprefix("flag ").removeprefix("flag: ")
        return f"flag of {name}"
    return name


@functools.lru_cache(maxsize=2)
def read_emoji_list(path: Path = EMOJI_TEST_PATH) -> tuple[EmojiEntry, ...]:
    """Every fully-qualified emoji of ``emoji-test.txt``, with captions."""
    _require_file(path, "unicode-data")
    names = _emoji_names()
    entries = []
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            codes, comment = line.split(";", 1)[0], line.split("#", 1)[1]
            text = "".join(chr(int(code, 16)) for code in codes.split())
            # The comment reads "<emoji> E<version> <name>".
            test_name = comment.strip().split(" ", 2)[2] if comment.strip().count(" ") >= 2 else ""
            entries.append(EmojiEntry(text, _caption(text, test_name, subgroup, names),
                                      base_emoji(text), group, subgroup))
    return tuple(entries)


def alias_captions(entry: EmojiEntry) -> tuple[str, ...]:
    """The other names of an emoji as captions (":heart_eyes:" -> "heart eyes"), without
    those equal to its name; none for flags."""
    if entry.subgroup in FLAG_SUBGROUPS:
        return ()
    data = _emoji_names().get(entry.text) or {}
    captions = []
    for alias in data.get("alias", ()):
        caption = alias.strip(":").replace("_", " ").strip()
        if caption and caption.lower() != entry.name.lower() and caption not in captions:
            captions.append(caption)
    return tuple(captions)


@functools.lru_cache(maxsize=2)
def read_names_list(path: Path = NAMES_LIST_PATH) -> dict[int, tuple[str, ...]]:
    """``NamesList.txt`` by code point: the character's name, then its informal aliases (the
    ``= ...`` lines), as written there ("SMILING FACE WITH OPEN MOUTH")."""
    _require_file(path, "unicode-data")
    names: dict[int, list[str]] = {}
    code = None
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = re.match(r"([0-9A-F]{4,6})\t(.+)", line)
        if entry:
            code = int(entry.group(1), 16)
            names[code] = [entry.group(2).strip()]
        elif not line.startswith("\t"):
            code = None
        elif code is not None and line.startswith("\t= "):
            names[code].append(line[3:].strip())
    return {code: tuple(lines) for code, lines in names.items()}


def unicode_captions(entry: EmojiEntry) -> tuple[str, ...]:
    """The Unicode character name and informal aliases of a one-code-point emoji
    (`read_names_list`), lower-cased ("SMILING FACE WITH OPEN MOUTH" -> "smiling face with open
    mouth"), without those equal to its name or one of its `alias_captions`; none for flags and
    emoji of several code points."""
    character = entry.text.replace(VARIATION_SELECTOR, "")
    if entry.subgroup in FLAG_SUBGROUPS or len(character) != 1:
        return ()
    known = {entry.name.lower(), *(alias.lower() for alias in alias_captions(entry))}
    captions = []
    for candidate in read_names_list().get(ord(character), ()):
        caption = candidate.lower().strip()
        if caption and caption not in known and caption not in captions:
            captions.append(caption)
    return tuple(captions)


#: The caption kinds other than ``names``: each gives an emoji's further captions.
OTHER_CAPTIONS = {"aliases": alias_captions, "unicode": unicode_captions}
CAPTION_KINDS = ("names", *OTHER_CAPTIONS)


def split_of(base: str, test_fraction: float, seed: int = 0) -> str:
    """``train`` or ``test`` for a base emoji (a stable hash, so variants stay together)."""
    return "test" if mix_seed("emoji-split", seed, base) % 10_000 < test_fraction * 10_000 else "train"


@dataclass
class EmojiConfig(Config):
    """Noto Color Emoji as an image-caption dataset.

    Args:
        split: ``train``, ``test`` or ``all``.
        size: image side in pixels.
        test_fraction: share of base emoji held out for ``test``.
        split_seed: seed of the split.
        background: RGB background behind the glyph.
        groups: keep only these Unicode groups (empty keeps all).
        captions: ``names`` (one sample per emoji), ``aliases`` (one sample per
            alias of an emoji, see `alias_captions`) or ``unicode`` (one sample per
            Unicode name or informal alias, see `unicode_captions`); with the last
            two, emoji without such a caption are left out.
    """

    split: str = "train"
    size: int = 64
    test_fraction: float = 0.1
    split_seed: int = 0
    background: tuple[int, int, int] = (255, 255, 255)
    groups: tuple[str, ...] = ()
    captions: str = "names"

    def validate(self) -> None:
        require(self.split in ("train", "test", "all"), "split", self.split, "'train', 'test' or 'all'")
        require(self.size >= 8, "size", self.size, ">= 8")
        require(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "in [0, 1)")
        require(len(self.background) == 3, "background", self.background, "an RGB triple")
        require(self.captions in CAPTION_KINDS, "captions", self.captions, f"one of {CAPTION_KINDS}")


@register_dataset("emoji")
class EmojiDataset(ImageTextDataset):
    """Emoji glyphs centred on a square background, captioned with their names."""

    config_class = EmojiConfig

    def __init__(self, config: EmojiConfig | None = None):
        self.config = config or EmojiConfig()
        _require_file(FONT_PATH, "fonts-noto-color-emoji")
        entries = read_emoji_list()
        if self.config.groups:
            known = sorted({e.group for e in entries})
            unknown = [g for g in self.config.groups if g not in known]
            if unknown:
                raise ValueError(f"unknown emoji groups {unknown}; known: {known}")
            entries = tuple(e for e in entries if e.group in self.config.groups)
        if self.config.split != "all":
            entries = tuple(e for e in entries
                            if split_of(e.base, self.config.test_fraction, self.config.split_seed)
                            == self.config.split)
        other_captions = OTHER_CAPTIONS.get(self.config.captions)
        if other_captions is not None:
            entries = tuple(dataclasses.replace(entry, name=caption)
                            for entry in entries for caption in other_captions(entry))
        self.entries = entries
        self._font = None

    def __len__(self) -> int:
        return len(self.entries)

    def _render(self, text: str) -> Image.Image:
        if self._font is None:
            self._font = ImageFont.truetype(str(FONT_PATH), FONT_SIZE)
        canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), text, font=self._font, embedded_color=True)
        box = canvas.getbbox()
        glyph = canvas.crop(box) if box else canvas
        side = max(glyph.size) + 8
        square = Image.new("RGB", (side, side), tuple(self.config.background))
        square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)
        return square.resize((self.config.size, self.config.size), Image.Resampling.LANCZOS)

    def caption(self, index: int) -> str:
        return self.entries[index].name

    def load(self, index: int) -> ImageTextSample:
        entry = self.entries[index]
        key = f"emoji/{'-'.join(f'{ord(c):x}' for c in entry.text)}"
        if self.config.captions != "names":
            key += "/" + entry.name.replace(" ", "-")
        return ImageTextSample(
            key=key,
            caption=entry.name,
            image=self._render(entry.text),
            metadata={"emoji": entry.text, "base": entry.base, "group": entry.group,
                      "subgroup": entry.subgroup},
        )

    def image_size(self, index: int) -> tuple[int, int]:
        return (self.config.size, self.config.size)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_font"] = None  # font handles do not pickle; workers reopen the file
        return state
