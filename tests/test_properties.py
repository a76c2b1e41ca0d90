"""Property tests (hypothesis) for the parsers and editors users feed text into.

- the caption the trainer builds from a caption file (read, trigger word, shuffle with keep_tokens):
  the trigger is never lost or doubled, no tag is invented or dropped, the kept tags stay in place;
  any bytes in a caption file read as one line of text;
- the sample-prompt line parser: generated valid prompts round-trip; any string gives a SamplePrompt,
  None or a LoraNbError, never another exception;
- config loading: any text or YAML structure, any override, gives a Config or a ConfigError.

(``edit_caption``'s own properties are in test_tagging.py.)
"""

from __future__ import annotations

import io
import random
import re
import tempfile
from collections import Counter
from pathlib import Path

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_nb import LoraNbError
from lora_nb import captions as cap
from lora_nb.config import Config, ConfigError, all_setting_names, check_config
from lora_nb.dataset import scan_dataset
from lora_nb.sampling import SAMPLERS, SamplePrompt, format_prompt_line, parse_prompt_line

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- captions, as the trainer sees them

tag_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=",\r\n\ufeff"),
                   max_size=10)
caption_text = st.lists(tag_text, max_size=10).map(", ".join)
trigger_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=","),
                       min_size=1, max_size=8).filter(lambda t: cap.normalize_tag(t) != "")

_IMAGE = None


def _one_image_dataset(root: Path, caption: bytes) -> Path:
    global _IMAGE
    folder = root / "1_sks"
    folder.mkdir()
    if _IMAGE is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
        _IMAGE = buf.getvalue()
    (folder / "img.png").write_bytes(_IMAGE)
    (folder / "img.txt").write_bytes(caption)
    return root


@FAST
@given(caption=caption_text, trigger=trigger_text, keep=st.integers(1, 4), seed=st.integers(0, 2**32))
def test_trainer_captions_keep_the_trigger_first_once_and_every_other_tag(caption, trigger, keep, seed):
    """scan_dataset → shuffle (keep_tokens ≥ 1), on any caption and trigger: the trigger is the first tag
    and occurs once; the other tags are exactly the file's other tags (none lost, none invented or
    doubled); shuffling keeps the first keep_tokens tags in place and only reorders the rest."""
    with tempfile.TemporaryDirectory() as d:
        scan = scan_dataset(_one_image_dataset(Path(d), caption.encode("utf-8")), trigger_word=trigger)
    (item,) = scan.items
    key = cap._key(trigger)
    tags = cap.split_tags(item.caption)
    assert tags[0] == cap.normalize_tag(trigger)
    assert [cap._key(t) for t in tags].count(key) == 1
    expected_others = [t for t in cap.split_tags(cap.normalize_caption_text(caption)) if cap._key(t) != key]
    assert tags[1:] == expected_others

    shuffled = cap.split_tags(cap.shuffle_caption(item.caption, keep_tokens=keep, rng=random.Random(seed)))
    assert shuffled[:keep] == tags[:keep]
    assert Counter(shuffled) == Counter(tags)


@FAST
@given(raw=st.binary(max_size=200))
def test_any_bytes_in_a_caption_file_read_as_one_line_of_text(raw):
    """Whatever bytes a caption file holds (any encoding, NULs, broken UTF-8), reading it gives one line of
    text: no exception, no line break, no NUL, no leading byte-order mark."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.txt"
        path.write_bytes(raw)
        text = cap.read_caption(path)
    assert isinstance(text, str)
    assert not re.search(r"[\r\n\x00]", text) and not text.startswith("\ufeff")


# --------------------------------------------------------------------------- sample prompt lines

_line_chars = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\x1c\x1d\x1e\x85")
prompt_text = st.text(alphabet=_line_chars, min_size=1, max_size=30).map(str.strip).filter(
    lambda t: t and not t.startswith("#") and not re.search(r"(^|\s)--", t))
sizes = st.integers(1, 1024).map(lambda n: n * 8)

valid_prompts = st.builds(
    SamplePrompt,
    prompt=prompt_text,
    negative_prompt=st.one_of(st.just(""), prompt_text),
    width=sizes, height=sizes,
    seed=st.integers(0, 2**63),
    steps=st.integers(1, 1000),
    cfg_scale=st.one_of(st.integers(0, 30).map(float), st.floats(0, 30, allow_nan=False, allow_infinity=False)),
    sampler=st.sampled_from(sorted(SAMPLERS)),
)


@FAST
@given(p=valid_prompts)
def test_every_valid_prompt_round_trips_through_its_line(p):
    """format_prompt_line → parse_prompt_line gives back the same SamplePrompt, and the same line again."""
    line = format_prompt_line(p)
    assert parse_prompt_line(line) == p
    assert format_prompt_line(parse_prompt_line(line)) == line


option_soup = st.lists(st.one_of(
    st.text(max_size=12),
    st.sampled_from([" --n ", " --w ", " --h ", " --d ", " --s ", " --l ", " --ss ", " --", "--", "#", " -- ",
                     "64", "-1", "1e999", "nan", "0", "Euler a", "k_euler", "\n", "\t", "1" * 5000]),
), max_size=8).map("".join)


@settings(max_examples=200, deadline=None)
@given(line=st.one_of(st.text(max_size=60), option_soup), multiple=st.sampled_from([None, 8, 16, 64]))
def test_any_string_is_a_prompt_none_or_a_named_error(line, multiple):
    """No string crashes the parser: it returns a SamplePrompt (sizes on the model's grid, a known sampler),
    None (blank or comment), or raises LoraNbError."""
    try:
        p = parse_prompt_line(line, size_multiple=multiple)
    except LoraNbError:
        return
    if p is None:
        assert not line.strip() or line.strip().startswith("#")
        return
    assert p.prompt and p.sampler in SAMPLERS
    step = 8 if multiple is None else max(8, multiple)
    assert p.width % step == 0 and p.height % step == 0 and p.steps >= 1 and p.cfg_scale >= 0


# --------------------------------------------------------------------------- config loading

SETTING_NAMES = all_setting_names()
SECTIONS = sorted({n.split(".")[0] for n in SETTING_NAMES})
FIELDS = sorted({n.split(".")[1] for n in SETTING_NAMES})

leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(), st.text(max_size=12),
                   st.dates())
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
sections = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers()), values,
                           max_size=5)
config_structures = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8)),
                    st.one_of(sections, values), max_size=4),
    values,
)


def _check_loaded(cfg: Config) -> None:
    assert isinstance(cfg, Config)
    check_config(cfg, cuda_available=False)  # validation never crashes either
    assert Config.from_yaml(cfg.to_yaml()) == cfg  # and what loads, saves and loads back the same


@FAST
@given(text=st.text(max_size=200))
def test_any_text_loads_as_a_config_or_a_config_error(text):
    """Arbitrary text as a config file: a Config or a ConfigError, never another exception."""
    try:
        cfg = Config.from_yaml(text, where="my.yaml")
    except ConfigError as exc:
        assert "my.yaml" in str(exc)
        return
    _check_loaded(cfg)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=config_structures)
def test_any_yaml_structure_loads_as_a_config_or_a_named_error(data):
    """Any YAML document (sections and settings real or misspelt, values of every type): a Config that
    validates, saves and reloads unchanged, or a ConfigError naming the file."""
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)
    try:
        cfg = Config.from_yaml(text, where="my.yaml")
    except ConfigError as exc:
        assert "my.yaml" in str(exc) or "overrides" in str(exc)
        return
    _check_loaded(cfg)


override_keys = st.one_of(st.sampled_from(SETTING_NAMES), st.sampled_from(FIELDS), st.text(max_size=12))
override_values = st.one_of(st.text(max_size=12), leaves, st.sampled_from(["[", "{a: 1", "1e999", ".nan",
                                                                           "2024-13-45", "'x", "- a", "null"]))


@FAST
@given(overrides=st.dictionaries(override_keys, override_values, max_size=4),
       as_list=st.booleans())
def test_any_override_gives_a_config_or_a_config_error(overrides, as_list):
    """``with_overrides`` with any keys and values, as a dict or as ``key=value`` strings (the CLI's --set):
    a Config or a ConfigError, never another exception; the original Config is unchanged."""
    base = Config()
    before = base.to_dict()
    arg = [f"{k}={v}" for k, v in overrides.items()] if as_list else overrides
    try:
        cfg = base.with_overrides(arg)
    except ConfigError:
        pass
    else:
        _check_loaded(cfg)
    assert base.to_dict() == before
