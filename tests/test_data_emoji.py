"""Noto emoji with their names: split by base emoji, flags named, clear errors when missing."""

import pytest

from nextstep.training.data import emoji as emoji_module
from nextstep.training.data.emoji import EmojiConfig, EmojiDataset, base_emoji

pytestmark = pytest.mark.skipif(
    not emoji_module.FONT_PATH.is_file() or not emoji_module.EMOJI_TEST_PATH.is_file(),
    reason="emoji data not installed; run `make data`",
)


@pytest.fixture(scope="module")
def splits():
    return EmojiDataset(EmojiConfig(split="train")), EmojiDataset(EmojiConfig(split="test"))


def test_train_and_test_share_no_base_emoji(splits):
    train, test = splits
    assert len(train) > 3000 and 200 < len(test) < 700
    assert not {e.base for e in train.entries} & {e.base for e in test.entries}
    toned = [e for e in train.entries + test.entries if "skin tone" in e.name]
    assert toned, "skin-tone variants are part of the data"


def test_captions_are_names_and_flags_say_flag_of(splits):
    everything = splits[0].entries + splits[1].entries
    names = {e.text: e.name for e in everything}
    assert names["\U0001F600"] == "grinning face"
    assert names["\U0001F1EB\U0001F1F7"] == "flag of France"
    assert all(not e.name.startswith("flag:") for e in everything)
    assert base_emoji("\U0001F44B\U0001F3FD") == "\U0001F44B"


def test_rendered_emoji_is_a_square_rgb_image(splits):
    sample = EmojiDataset(EmojiConfig(split="all", size=32)).load(0)
    assert sample.image.size == (32, 32) and sample.image.mode == "RGB"
    assert sample.caption == "grinning face"
    colours = sample.image.getcolors(32 * 32)
    assert len(colours) > 10  # a coloured glyph, not a blank square


def test_missing_font_names_the_package_and_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji_module, "FONT_PATH", tmp_path / "none.ttf")
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji.*make data"):
        EmojiDataset(EmojiConfig())


def test_alias_captions_add_other_names_of_the_same_glyphs(splits):
    train, test = splits
    aliases = EmojiDataset(EmojiConfig(split="train", captions="aliases"))
    assert 300 < len(aliases) < len(train)
    names = {e.text: e.name for e in train.entries}
    joy = [e.name for e in aliases.entries if e.text == "\U0001F602"]
    assert joy == ["joy"] and names["\U0001F602"] == "face with tears of joy"
    assert {e.text for e in aliases.entries} <= set(names), "aliases only of the split's emoji"
    assert all(e.name.lower() != names[e.text].lower() for e in aliases.entries)
    assert not [e for e in aliases.entries if e.subgroup in emoji_module.FLAG_SUBGROUPS]
    held_out = EmojiDataset(EmojiConfig(split="test", captions="aliases"))
    assert {e.base for e in held_out.entries} <= {e.base for e in test.entries}
    keys = [aliases.load(i).key for i in range(20)]
    assert len(set(keys)) == len(keys), "one key per alias sample"


def test_an_unknown_caption_kind_is_named():
    with pytest.raises(ValueError, match="captions.*'names', 'aliases', 'unicode'"):
        EmojiConfig(captions="keywords")


def test_unicode_captions_are_character_names_and_informal_aliases_the_other_sources_lack(splits):
    train, test = splits
    every = EmojiDataset(EmojiConfig(split="all", captions="unicode"))
    captions = {}
    for entry in every.entries:
        captions.setdefault(entry.text, []).append(entry.name)
    assert captions["\U0001F603"] == ["smiling face with open mouth"]  # named "grinning face with big eyes"
    assert "face palm" in captions["\U0001F926"] and "dog dirt" in captions["\U0001F4A9"]
    assert "\U0001F602" not in captions, "its Unicode name is its name, its informal aliases none"
    assert all(len(text.replace(emoji_module.VARIATION_SELECTOR, "")) == 1 for text in captions)
    assert not [e for e in every.entries if e.subgroup in emoji_module.FLAG_SUBGROUPS]
    named = {e.text: e for e in train.entries + test.entries}
    for entry in every.entries:
        known = {named[entry.text].name.lower(), *emoji_module.alias_captions(named[entry.text])}
        assert entry.name not in known
    held_out = EmojiDataset(EmojiConfig(split="test", captions="unicode"))
    assert {e.base for e in held_out.entries} <= {e.base for e in test.entries}
    train_unicode = EmojiDataset(EmojiConfig(split="train", captions="unicode"))
    assert 300 < len(train_unicode) < len(train)
    keys = [sample.key for sample in map(train_unicode.load, range(20))]
    assert len(set(keys)) == len(keys), "one key per caption"


def test_the_names_list_is_read_per_code_point_name_first_then_informal_aliases(tmp_path):
    names_list = tmp_path / "NamesList.txt"
    names_list.write_text("@@\t1F300\tMisc\n1F300\tCYCLONE\n\t= typhoon, hurricane\n\tx (see - 1F32A)\n"
                          "1F301\tFOGGY\n@\t\tWeather\n\t= not an alias of FOGGY\n1F302\tCLOSED UMBRELLA\n"
                          "\t= one\n\t= two\n", encoding="utf-8")
    assert emoji_module.read_names_list(names_list) == {0x1F300: ("CYCLONE", "typhoon, hurricane"),
                                                        0x1F301: ("FOGGY",),
                                                        0x1F302: ("CLOSED UMBRELLA", "one", "two")}


def test_a_zero_test_fraction_holds_out_nothing():
    import itertools

    from nextstep.training.data.emoji import split_of
    from nextstep.training.data.loader import mix_seed
    base = next(f"x{i}" for i in itertools.count() if mix_seed("emoji-split", 0, f"x{i}") % 10_000 == 0)
    assert split_of(base, 0.0) == "train"


def test_a_flag_caption_drops_the_flag_prefix():
    from nextstep.training.data.emoji import _caption
    names = {"\U0001F1EB\U0001F1F7": {"en": ":flag_France:"}}
    assert _caption("\U0001F1EB\U0001F1F7", "flag: France", "country-flag", names) == "flag of France"


def test_every_skin_tone_variant_falls_on_the_side_of_its_base_emoji(splits):
    train, test = splits
    assert all(e.base == base_emoji(e.text) for e in train.entries + test.entries)
    toned = [e for e in train.entries + test.entries if e.text != e.base]
    assert len(toned) > 500
    train_bases = {base_emoji(e.text) for e in train.entries}
    test_bases = {base_emoji(e.text) for e in test.entries}
    assert test_bases and not train_bases & test_bases
